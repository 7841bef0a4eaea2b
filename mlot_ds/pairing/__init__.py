"""Cross-tokenizer pairing rules: pure functions from tokenized records to :class:`Pairing`."""

from mlot_ds.pairing.dtw import dtw_pairs
from mlot_ds.pairing.offsets import OffsetGroup, offset_groups, offsets_pairs
from mlot_ds.pairing.position import IGNORE_INDEX, position_pairing
from mlot_ds.pairing.surface import token_surface_bytes, tokenizer_fingerprint
from mlot_ds.pairing.types import ModelBatch, Pairing, pack_pairs
from mlot_ds.pairing.vocab_map import mined_vocab_map

__all__ = [
    "IGNORE_INDEX",
    "ModelBatch",
    "OffsetGroup",
    "Pairing",
    "dtw_pairs",
    "mined_vocab_map",
    "offset_groups",
    "offsets_pairs",
    "pack_pairs",
    "position_pairing",
    "token_surface_bytes",
    "tokenizer_fingerprint",
]
