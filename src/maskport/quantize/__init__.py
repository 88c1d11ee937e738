"""``maskport quantize``: 4/8-bit GPTQ or AWQ exports (language-model decoder linears only), via GPTQModel.

The Python API is :func:`maskport.quantize.api.quantize_export`; the CLI command is
:data:`maskport.quantize.command.quantize_command`. Nothing heavy is imported here.
"""
