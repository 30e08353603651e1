"""Predictions of a MoECLModel on one task: classifier heads, greedy generation, or option likelihood."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moecl.metrics import normalize_answer
from moecl.model.encoding import Encoder, collate, pad_id
from moecl.model.moecl_model import MoECLModel, TaskInfo


@dataclass
class Prediction:
    label: str  # the predicted label (for generation: the generated answer when it matches no label)
    confidence: float  # probability of `label` where scores exist, else 1.0 for a label match, 0.0 otherwise
    scores: dict[str, float] = field(default_factory=dict)
    answer: str | None = None  # the raw generated text (generation only)

    def as_dict(self) -> dict:
        out = {"label": self.label, "confidence": round(self.confidence, 6)}
        if self.scores:
            out["scores"] = {k: round(v, 6) for k, v in self.scores.items()}
        if self.answer is not None:
            out["answer"] = self.answer
        return out


def _chunks(seq, size):
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _device(model: MoECLModel) -> torch.device:
    return model.layers[0].base.down_proj.weight.device


@torch.no_grad()
def predict_classifier(model, tokenizer, info: TaskInfo, texts, max_length, batch_size, disabled=False):
    enc = Encoder(tokenizer, info.task_id, info.labels, info.instruction, "classifier", max_length)
    pad, device, out = pad_id(tokenizer), _device(model), []
    for chunk in _chunks(list(texts), batch_size):
        batch = collate([enc.encode(t) for t in chunk], pad).to(device)
        with model.routed(batch.tasks, disabled=disabled):
            probs = torch.softmax(
                model.classify(batch.input_ids, batch.attention_mask, info.task_id).float(), -1
            )
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Prediction(info.labels[best], row[best], dict(zip(info.labels, row))))
    return out


@torch.no_grad()
def option_scores(
    model, tokenizer, info: TaskInfo, texts, max_length, batch_size, disabled=False, per_token=False
):
    """Per text, the softmax over options of each option's summed log-likelihood after the prompt; with
    `per_token`, of its mean log-likelihood per answer token (options of different lengths on one scale)."""
    enc = Encoder(tokenizer, info.task_id, info.labels, info.instruction, "instruction", max_length)
    eos = tokenizer.eos_token_id
    pairs = []
    for ti, text in enumerate(texts):
        prompt = enc.encode(text, with_answer=False).input_ids
        for label in info.labels:
            answer = enc.answer_ids[label]
            answer = answer[:-1] if (eos is not None and len(answer) > 1 and answer[-1] == eos) else answer
            pairs.append((ti, label, prompt + answer, len(prompt)))
    pad, device = pad_id(tokenizer), _device(model)
    loglik = torch.zeros(len(pairs))
    from moecl.model.encoding import Encoded

    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = collate([Encoded(ids, n, -1, info.task_id) for _, _, ids, n in chunk], pad).to(device)
        window = batch.answer_window()
        with model.routed(batch.tasks, disabled=disabled):
            logits = model.lm_logits(batch.input_ids, batch.attention_mask, keep_last=window).float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = batch.answer_targets(window)
        valid = targets != -100
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
        total = picked.sum(-1)
        if per_token:
            total = total / valid.sum(-1).clamp(min=1)
        loglik[start : start + len(chunk)] = total.cpu()
    n_opt = len(info.labels)
    per_text = torch.softmax(loglik.view(len(texts), n_opt), dim=-1)
    return [dict(zip(info.labels, row)) for row in per_text.tolist()]


@torch.no_grad()
def predict_likelihood(
    model, tokenizer, info, texts, max_length, batch_size, disabled=False, per_token=False
):
    out = []
    for scores in option_scores(model, tokenizer, info, texts, max_length, batch_size, disabled, per_token):
        best = max(scores, key=scores.get)
        out.append(Prediction(best, scores[best], scores))
    return out


@torch.no_grad()
def predict_generate(model, tokenizer, info, texts, max_length, batch_size, max_new_tokens, disabled=False):
    enc = Encoder(tokenizer, info.task_id, info.labels, info.instruction, "instruction", max_length)
    by_norm = {normalize_answer(label): label for label in info.labels}
    pad, device, out = pad_id(tokenizer), _device(model), []
    for chunk in _chunks(list(texts), batch_size):
        batch = collate([enc.encode(t, with_answer=False) for t in chunk], pad).to(device)
        with model.routed(batch.tasks, disabled=disabled):
            generated = model.base_model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = generated[:, batch.input_ids.shape[1] :]
        for row in new_tokens.tolist():
            text = tokenizer.decode(row, skip_special_tokens=True)
            answer = text.strip().split("\n")[0].strip()
            label = by_norm.get(normalize_answer(answer))
            out.append(
                Prediction(label if label is not None else answer, 1.0 if label else 0.0, answer=answer)
            )
    return out


def predict(
    model: MoECLModel,
    tokenizer,
    task_id: str,
    texts,
    *,
    max_length: int = 256,
    batch_size: int = 16,
    instruction_eval: str = "generate",
    max_new_tokens: int = 8,
    disabled: bool = False,
    with_scores: bool = False,
) -> list[Prediction]:
    """Predict labels for `texts` on `task_id` (raises UnknownTaskError for a task the bank lacks)."""
    info = model.task(task_id)
    was_training = model.training
    model.eval()
    try:
        if model.mode == "classifier":
            return predict_classifier(model, tokenizer, info, texts, max_length, batch_size, disabled)
        if instruction_eval in ("likelihood", "likelihood_per_token"):
            per_token = instruction_eval == "likelihood_per_token"
            return predict_likelihood(
                model, tokenizer, info, texts, max_length, batch_size, disabled, per_token
            )
        preds = predict_generate(
            model, tokenizer, info, texts, max_length, batch_size, max_new_tokens, disabled
        )
        if with_scores:
            for p, scores in zip(
                preds, option_scores(model, tokenizer, info, texts, max_length, batch_size, disabled)
            ):
                p.scores = scores
                p.confidence = scores.get(p.label, 0.0)
        return preds
    finally:
        model.train(was_training)
