"""Exported code of the family: copied verbatim into each export (see the family's FamilySpec). Inside the package,
the shared heads are made importable as siblings, as they are in an export folder."""

from ....heads import alias_remote_heads

alias_remote_heads(__name__)
