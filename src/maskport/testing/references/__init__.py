"""Independent reference implementations (the oracles the tests compare maskport's exports against)."""
