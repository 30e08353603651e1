"""Tiny, in-process models and tasks for tests and the smoke benchmark (no hub, no downloads)."""

from __future__ import annotations

import random

from moecl.data.task import Record, TaskData

_WORDS = {
    "sports": "match goal team coach score league player season win cup striker",
    "business": "market shares profit bank stock company merger revenue trade price",
    "science": "research atom cell planet theory experiment lab physics data gene",
    "politics": "election vote senate policy minister law party debate campaign",
    "positive": "great lovely excellent happy wonderful superb enjoyed perfect",
    "negative": "awful terrible bad broken poor refund angry disappointed worst",
    "spam": "winner prize free money click offer viagra lottery urgent cash",
    "ham": "meeting tomorrow lunch project notes thanks family schedule report",
}


def make_task(
    task_id: str,
    labels: list[str],
    n_train: int = 24,
    n_test: int = 12,
    seed: int = 0,
    instruction: str = "",
    positive_label: str | None = None,
) -> TaskData:
    """A synthetic, learnable task: each label has its own vocabulary, mixed with shared filler words."""
    rng = random.Random(f"{task_id}-{seed}")
    filler = "the a of and to in is it for on with as".split()

    def records(n: int, split: str) -> list[Record]:
        out = []
        for i in range(n):
            label = labels[i % len(labels)]
            vocab = _WORDS.get(label, label).split()
            words = [rng.choice(vocab) for _ in range(4)] + [rng.choice(filler) for _ in range(4)]
            rng.shuffle(words)
            out.append(Record(f"{split}{i} " + " ".join(words), label))
        return out

    return TaskData(
        task_id=task_id,
        labels=list(labels),
        train=records(n_train, "tr"),
        test=records(n_test, "te"),
        instruction=instruction or f"Which label fits this {task_id} text?",
        positive_label=positive_label,
    )


def tiny_tokenizer(extra_texts: list[str] | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(v.split()) for v in _WORDS.values()] + list(extra_texts or [])
    corpus += ["Classify the text into one of the options.", "Options: Text: Answer:", "0123456789 , . : \n"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.padding_side = "left"
    return fast


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model
