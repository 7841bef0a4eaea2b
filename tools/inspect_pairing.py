"""Show how one record is tokenized by a student and a teacher, and what is distilled to what.

    python tools/inspect_pairing.py --student STUDENT_TOKENIZER_DIR --teacher TEACHER_TOKENIZER_DIR \\
        --prompt "Summarize the dialogue.\\n#Person1#: Hi!\\nSummary:" --response "They greet." --pairing offsets

The record goes through the real data pipeline (templates, BOS/EOS policy, prompt and response
tokenized in one text, pairing), so the output is exactly what training would use. For each side:
how the response was cut from the prompt + response tokens (``joint``, or ``alone`` where a token
straddles the boundary), then every response token with its logit row, its byte span in the
response (the spans training pairs by) and its text. Then the pairs: for ``offsets`` the groups
(the text both sides spell alike, the tokens of each side, and the one pair of rows distilled),
for ``position`` and ``dtw`` the paired tokens (for ``dtw`` also the teacher token that the MinED
vocabulary map gives the student token). A bad path exits with status 1 and a clear message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IGNORE_INDEX = -100


def _quoted(text: str) -> str:
    """A token for display: quoted, newlines and tabs visible (bytes are already escaped)."""
    return "'" + text.replace("\n", "\\n").replace("\t", "\\t") + "'"


def _response_tokens(side, part, row: int = 0) -> tuple[int, list[int]]:
    """(position of the first response token, response ids without the EOS) of one row."""
    labels = part.labels[row]
    positions = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    ids = labels[positions].tolist()
    if side.append_eos:
        ids = ids[:-1]
    return positions[0], ids


def _show_side(label, side, part, response, encoded):
    from mlot_ds.pairing.surface import token_display_strings

    first, ids = _response_tokens(side, part)
    if ids != encoded["response_ids"]:
        raise RuntimeError(f"{label}: the batch and the tokenized dataset hold different response tokens")
    spans, method = encoded["spans"], encoded["offsets_method"]
    prompt_ids = part.input_ids[0][:first].tolist()
    print(f"{label}: {side.tokenizer.name_or_path} ({type(side.tokenizer).__name__}, {len(side.tokenizer)} tokens)")
    print(f"  prompt: {len(prompt_ids)} tokens, starts {token_display_strings(side.tokenizer, prompt_ids[:3])!r}, "
          f"ends {token_display_strings(side.tokenizer, prompt_ids[-3:])!r}")
    print(f"  response: {len(ids)} tokens{' + EOS' if side.append_eos else ''}, tokenized {encoded['tokenization']}; "
          f"byte spans by {method}")
    data = response.encode("utf-8")
    print(f"  {'#':>3} {'row':>5}  {'token':<18} {'bytes':<9} text")
    for index, (token, (start, end)) in enumerate(zip(token_display_strings(side.tokenizer, ids), spans)):
        text = data[start:end].decode("utf-8", errors="backslashreplace")
        print(f"  {index:>3} {first + index - 1:>5}  {_quoted(token):<18} {f'{start}:{end}':<9} {_quoted(text)}")
    return first, ids, spans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True, help="student tokenizer directory")
    parser.add_argument("--teacher", required=True, help="teacher tokenizer directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--response", required=True)
    parser.add_argument("--pairing", default="offsets", choices=("offsets", "position", "dtw"))
    parser.add_argument("--student-template", default="plain", choices=("plain", "chat"))
    parser.add_argument("--teacher-template", default="plain", choices=("plain", "chat"))
    parser.add_argument("--distill-final-eos", action="store_true", help="also pair the final EOS")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where to cache the dtw vocabulary map")
    args = parser.parse_args(argv)
    prompt = args.prompt.replace("\\n", "\n")
    response = args.response.replace("\\n", "\n").strip()
    if not response:
        print("error: --response is empty", file=sys.stderr)
        return 1

    from mlot_ds.data import DistillationData, ModelSide, Record, RecordSet, Template, load_tokenizer
    from mlot_ds.pairing.offsets import offset_groups
    from mlot_ds.pairing.surface import token_display_strings

    try:
        student_tokenizer = load_tokenizer(args.student)
        teacher_tokenizer = load_tokenizer(args.teacher)
        student = ModelSide("student", student_tokenizer, Template(args.student_template),
                            distill_final_eos=args.distill_final_eos)
        teacher = ModelSide("teacher", teacher_tokenizer, Template(args.teacher_template), pairing=args.pairing)
        data = DistillationData(RecordSet([Record(0, prompt, response, (response,))]), student, [teacher],
                                max_length=1 << 20, micro_batch_size=1, grad_accum=1, world_size=1, rank=0, seed=0,
                                cache_dir=args.cache_dir, progress=False)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    batch = data.micro_batches(0, 0)[0]
    s_first, s_ids, s_spans = _show_side("student", student, batch.student, response, data.record_tokens("student", 0))
    print()
    t_first, t_ids, t_spans = _show_side("teacher", teacher, batch.teachers["teacher"], response,
                                         data.record_tokens("teacher", 0))
    pairing = batch.pairings["teacher"]
    rows = list(zip(pairing.student_index[0][pairing.mask[0]].tolist(), pairing.teacher_index[0][pairing.mask[0]].tolist()))
    print(f"\npairing {args.pairing}: {len(rows)} pairs (student row -> teacher row; each row predicts the next token)")
    s_show = token_display_strings(student_tokenizer, s_ids) + ["<EOS>"]
    t_show = token_display_strings(teacher_tokenizer, t_ids) + ["<EOS>"]
    if args.pairing == "offsets":
        data_bytes = response.encode("utf-8")
        by_first = {s_row: t_row for s_row, t_row in rows}
        for number, group in enumerate(offset_groups(s_spans, t_spans)):
            s_row = s_first + group.student_tokens[0] - 1
            distilled = f"{s_row} -> {by_first[s_row]}" if s_row in by_first else "-"
            text = data_bytes[group.start : group.end].decode("utf-8", errors="backslashreplace")
            s_tokens = " ".join(_quoted(s_show[i]) for i in group.student_tokens)
            t_tokens = " ".join(_quoted(t_show[i]) for i in group.teacher_tokens)
            print(f"  group {number:>3} {_quoted(text):<22} student [{s_tokens}]  teacher [{t_tokens}]  rows {distilled}")
        if len(rows) > len(offset_groups(s_spans, t_spans)):
            print(f"  final EOS: rows {rows[-1][0]} -> {rows[-1][1]}")
    else:
        mapping = data.vocab_maps.get("teacher")
        for s_row, t_row in rows:
            s_token, t_token = s_row + 1 - s_first, t_row + 1 - t_first
            s_text, t_text = _quoted(s_show[min(s_token, len(s_ids))]), _quoted(t_show[min(t_token, len(t_ids))])
            line = f"  rows {s_row:>5} -> {t_row:<5} {s_text:<18} {t_text}"
            if mapping is not None and s_token < len(s_ids):
                mapped = token_display_strings(teacher_tokenizer, [int(mapping[s_ids[s_token]])])[0]
                line += f"   (MinED map: {_quoted(mapped)})"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
