"""VQA evaluation: rank the answer list for every test question (sharded across ranks, merged on every rank) and,
when the test file has the annotators' answers, the VQA accuracy."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from dataset.vqa_dataset import tokenize_answers
from utils import distributed as du


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA metric: ``min(1, matches / 3)`` averaged over the leave-one-annotator-out subsets (exact string
    match; the official script also normalises punctuation, numbers and articles, which the synthetic answers
    never need)."""
    if not answers:
        raise ValueError("no ground-truth answers")
    if len(answers) == 1:
        return float(prediction == answers[0])
    matches = sum(a == prediction for a in answers)
    # leaving out a matching annotator leaves matches-1 matches, any other leaves all of them
    total = sum(min(1.0, (matches - (a == prediction)) / 3) for a in answers)
    return total / len(answers)


@torch.no_grad()
def predict_answers(model, loader, answer_list: Sequence[str], tokenizer, device: torch.device, k: int,
                    first_token_twice: bool = True) -> List[Dict]:
    """``[{"question_id", "answer"}]`` for every question of ``loader`` (this rank's shard), all ranks merged and
    sorted by question id. A record also gets ``"acc"`` when the batch carries the annotators' answers."""
    model.eval()
    cands = {k_: v.to(device) for k_, v in tokenize_answers(tokenizer, answer_list).items()}
    results: List[Dict] = []
    for batch in loader:
        ids, _ = model.answer(batch["image"].to(device), batch["question_ids"].to(device),
                              batch["question_mask"].to(device), cands["input_ids"], cands["attention_mask"], k=k,
                              first_token_twice=first_token_twice)
        for j, (qid, best) in enumerate(zip(batch["question_id"].tolist(), ids[:, 0].tolist())):
            rec = {"question_id": qid, "answer": answer_list[best]}
            if "gt" in batch:
                rec["acc"] = vqa_accuracy(rec["answer"], batch["gt"][j])
            results.append(rec)
    merged = [r for part in du.all_gather_object(results) for r in part]
    return sorted(merged, key=lambda r: r["question_id"])
