"""mlot-ds: multi-teacher cross-tokenizer distillation with MultiLevelOT on DeepSpeed ZeRO-3.

Importing the package has no side effects: no distributed initialisation, no heavy imports.
"""

__version__ = "0.1.0"
