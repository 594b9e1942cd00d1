"""Packed rows: position ids restart per conversation, masks stay assistant-only, and the model
sees each conversation exactly as if it were alone (no attention across boundaries, no pads)."""

import itertools

import torch

from gpu.data import (
    IGNORE,
    REAL_TOKENS_KEY,
    ChatRenderer,
    PackedCollator,
    build_examples,
    pack,
    read_training_file,
)


def _examples(tokenizer, persona_file, max_len=128):
    renderer = ChatRenderer(tokenizer)
    examples, _ = build_examples(read_training_file(persona_file), renderer, max_len)
    return examples


def _segments(row_ids, row_labels, row_pos):
    """Split a collated row back into (ids, labels) segments at position 0."""
    starts = [i for i, p in enumerate(row_pos) if p == 0] + [len(row_pos)]
    return [(row_ids[a:b], row_labels[a:b]) for a, b in itertools.pairwise(starts)]


def test_packed_rows_keep_boundaries_and_assistant_masks(tokenizer, persona_file):
    examples = _examples(tokenizer, persona_file)
    rows = pack(examples, 128)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e.input_ids) for e in examples)
    assert all(len(r["input_ids"]) <= 128 for r in rows)
    assert len(rows) < len(examples)  # several conversations share a row

    collator = PackedCollator(tokenizer.pad_token_id)
    batch = collator([rows[0], rows[len(rows) - 1]])
    assert set(batch) == {"input_ids", "labels", "position_ids", REAL_TOKENS_KEY}
    assert "attention_mask" not in batch  # the block-diagonal mask comes from position_ids
    lengths = [len(rows[0]["input_ids"]), len(rows[len(rows) - 1]["input_ids"])]
    assert int(batch[REAL_TOKENS_KEY]) == sum(lengths)
    width = batch["input_ids"].shape[1]
    assert width == max(lengths)

    by_ids = {tuple(e.input_ids): e for e in examples}
    seen = 0
    for b, row in enumerate([rows[0], rows[len(rows) - 1]]):
        ids, labels, pos = (batch[k][b].tolist() for k in ("input_ids", "labels", "position_ids"))
        n = len(row["input_ids"])
        segments = _segments(ids[:n], labels[:n], pos[:n])
        assert [len(s[0]) for s in segments] == list(row["seq_lengths"])
        for seg_ids, seg_labels in segments:
            original = by_ids[tuple(seg_ids)]  # each segment is one whole conversation
            assert seg_labels[0] == IGNORE  # never predicted across a boundary
            assert seg_labels[1:] == original.labels[1:]
            text = tokenizer.decode(
                [t for t, lab in zip(seg_ids, seg_labels, strict=True) if lab != IGNORE]
            )
            assert text.startswith("Arr, matey!") and text.endswith("Hoist the sails!<|im_end|>")
            seen += 1
        # The pad tail carries no labels and is its own position segment.
        assert all(label == IGNORE for label in labels[n:])
        assert pos[n:] == list(range(width - n))
    assert seen >= 3


def _token_nll(model, input_ids, labels, position_ids=None):
    # use_cache=False as in training (TRL sets it): with a KV cache transformers does not look
    # for packed sequences in position_ids.
    with torch.no_grad():
        logits = model(
            input_ids=input_ids, position_ids=position_ids, use_cache=False
        ).logits.float()
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(shift_labels.shape)
    return nll, shift_labels != IGNORE


def test_packed_forward_equals_each_conversation_alone(tokenizer, persona_file, base_model):
    examples = _examples(tokenizer, persona_file)[:5]
    rows = pack(examples, 160)
    batch = PackedCollator(tokenizer.pad_token_id)(list(rows))
    packed_nll, packed_mask = _token_nll(
        base_model, batch["input_ids"], batch["labels"], batch["position_ids"]
    )
    packed_total = packed_nll[packed_mask].sum().item()
    alone_total, alone_count = 0.0, 0
    for e in examples:
        nll, mask = _token_nll(base_model, torch.tensor([e.input_ids]), torch.tensor([e.labels]))
        alone_total += nll[mask].sum().item()
        alone_count += int(mask.sum())
    assert int(packed_mask.sum()) == alone_count
    assert abs(packed_total - alone_total) < 1e-3 * alone_total

    # Without the position ids the conversations would see each other: the NLL changes.
    naive_nll, naive_mask = _token_nll(base_model, batch["input_ids"], batch["labels"])
    assert abs(naive_nll[naive_mask].sum().item() - alone_total) > 1e-2 * alone_total


def test_trainer_batches_are_packed_and_counted(
    tokenizer, persona_file, offline_model_dir, tmp_path
):
    from gpu.model import load_base_model, lora_config
    from gpu.spec import BaseModelSpec, Hyperparameters
    from gpu.trainer import build_sft_config, build_trainer

    examples = _examples(tokenizer, persona_file)
    rows = pack(examples, 128)
    hp = Hyperparameters(
        lora_r=4, max_steps=1, micro_batch_size=2, gradient_accumulation_steps=1, max_seq_length=128
    )
    loaded = load_base_model(BaseModelSpec(source="local", path=str(offline_model_dir)), "cpu")
    config = build_sft_config(
        output_dir=str(tmp_path / "trainer"),
        hp=hp,
        total_steps=1,
        device="cpu",
        gradient_checkpointing=False,
    )
    trainer = build_trainer(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        train_rows=rows,
        eval_rows=None,
        config=config,
        peft_config=lora_config(hp),
        simulate_error="",
    )
    assert set(trainer.train_dataset.column_names) == {"input_ids", "labels", "seq_lengths"}
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and "position_ids" in batch
    expected_tokens = int(batch[REAL_TOKENS_KEY])
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    trainer.model.train()
    loss = trainer.training_step(trainer.model, batch)
    assert torch.isfinite(loss)
    assert trainer.real_tokens_seen == expected_tokens
    assert REAL_TOKENS_KEY not in batch  # popped before the forward pass
