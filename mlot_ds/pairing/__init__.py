"""Cross-tokenizer pairing rules: pure functions from tokenized records to :class:`Pairing`."""

from mlot_ds.pairing.position import IGNORE_INDEX, position_pairing
from mlot_ds.pairing.types import Pairing, pack_pairs

__all__ = ["IGNORE_INDEX", "Pairing", "pack_pairs", "position_pairing"]
