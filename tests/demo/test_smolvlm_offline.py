"""The smolvlm-offline model: SmolLM2 stays bit-identical inside it, the training shortcut is the model's
own loss, and the saved checkpoint goes through the pipeline's loading, prompt and generation doors.

Accuracy is not tested here: the full recipe takes 8 min on 2 threads (the workflow's one thread: longer)
and reaches 0.788 on 500 held-out questions (README); a tiny recipe exercises the same code in about a minute."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from qsvd.data.easy_vqa import easy_vqa_records
from qsvd.demo.smolvlm_offline import (
    NEW_TOKENS,
    SmolVLMParts,
    build_smolvlm_model,
    build_smolvlm_processor,
    fit_smolvlm_offline,
)
from qsvd.demo.train import (
    SUMMARY,
    answer_accuracy,
    generated_answers,
    held_out_questions,
    prompt_batch,
    save_demo_model,
    shared_prefix_loss,
)
from qsvd.models.checkpoint import open_model
from qsvd.models.prompts import chat_prompt, decode_generated, encode_prompt, encode_with_answer
from qsvd.models.registry import decoder_layers, family_by_name, family_of

pytestmark = pytest.mark.slow

# The real training path at a size for tests: a few images and questions, a few steps of each phase.
TINY = {"max_train_images": 16, "max_vision_images": 24, "vision_epochs": 1, "max_train_questions": 16, "eval_questions": 8}


@pytest.fixture
def smollm2_dir(smollm2_checkpoint):
    """The SmolLM2 export that the workflow's smolvlm_offline_language_model rule makes."""
    return smollm2_checkpoint


@pytest.fixture(scope="module")
def trained(smollm2_checkpoint, tmp_path_factory):
    """(directory, model, processor, summary) of the tiny recipe, trained once for this module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        model, processor, summary = fit_smolvlm_offline(smollm2_checkpoint, seed=0, **TINY)
        directory = save_demo_model(tmp_path_factory.mktemp("smolvlm") / "model", model, processor, summary)
    return directory, model, processor, summary


def test_shared_prefix_loss_equals_full_prompt_loss(smollm2_dir):
    """The training shortcut (one prefix per image, its cache reused) is the model's own loss on full prompts."""
    records, paths = easy_vqa_records("train")
    processor = build_smolvlm_processor(smollm2_dir)
    model = build_smolvlm_model(processor, smollm2_dir, seed=1)
    parts = SmolVLMParts(original_vocab=model.config.text_config.vocab_size - len(NEW_TOKENS))
    family = family_by_name("smolvlm")
    names = ("0.png", "1.png")
    chosen = [r for r in records[:40] if r.image in names]
    images = {name: Image.open(paths[int(name.split(".")[0])]).convert("RGB") for name in names}
    with torch.no_grad():
        pixels = processor.image_processor(images=list(images.values()), return_tensors="pt")["pixel_values"].flatten(0, 1)
        owner = torch.tensor([names.index(r.image) for r in chosen])
        shared = shared_prefix_loss(model, prompt_batch(processor, chosen, "smolvlm"), parts.patch_features(model, pixels),
                                    owner, torch.arange(len(chosen)), parts)
        batches = [encode_with_answer(processor, family, r.question, r.answer, images[r.image]) for r in chosen]
        losses = [model(**b).loss * (b["labels"] != -100).sum() for b in batches]
    tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert torch.allclose(shared, torch.stack(losses).sum() / tokens, atol=1e-4)


def test_language_model_is_smollm2_bit_for_bit(smollm2_dir, trained):
    directory, model, processor, _ = trained
    smollm2 = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    reference = smollm2.model.state_dict()
    ours = model.model.text_model.state_dict()
    vocab = smollm2.config.vocab_size
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        mine = ours[name][:vocab] if name == "embed_tokens.weight" else ours[name]
        assert torch.equal(mine, tensor), name
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, as in SmolLM2
    added = ours["embed_tokens.weight"][vocab:]
    assert added.shape[0] == len(NEW_TOKENS) == len(processor.tokenizer) - vocab
    assert not torch.equal(added[0], smollm2.model.embed_tokens.weight.mean(0))  # the new rows trained


def test_tiny_recipe_runs_every_planned_step_and_records_its_summary(trained):
    directory, *_, summary = trained
    assert not summary["cut_by_time_limit"]
    assert summary["lm_steps"] == summary["lm_steps_planned"] > 0
    assert summary["held_out_questions"] == TINY["eval_questions"]
    assert (summary["vision_images"], summary["train_images"]) == (24, 16)  # the vision phase sees more images
    assert json.loads((directory / SUMMARY).read_text())["held_out_accuracy"] == summary["held_out_accuracy"]
    assert summary["trained_parameters"] < summary["parameters"] / 100  # the vision side only


def test_checkpoint_reloads_through_the_pipeline_doors(trained):
    directory, model, processor, summary = trained
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        reloaded, reprocessor = open_model(str(directory), "smolvlm")
    family = family_by_name("smolvlm")
    assert family_of(reloaded) is family and len(decoder_layers(reloaded, family)) == 30
    records, paths = held_out_questions(TINY["eval_questions"])
    r = records[0]
    image = Image.open(paths[r.image]).convert("RGB")
    prompt = chat_prompt(reprocessor, family, r.question)
    assert prompt == f"<|im_start|>User:<image>{r.question}<end_of_utterance>\nAssistant:"
    batch = encode_prompt(reprocessor, family, r.question, image)
    ids = batch["input_ids"][0].tolist()
    assert ids[0] == reprocessor.tokenizer.bos_token_id and ids.count(reprocessor.tokenizer.bos_token_id) == 1
    assert ids.count(reloaded.config.image_token_id) == summary["image_tokens"] == 16
    with torch.no_grad():
        assert torch.equal(model(**encode_prompt(processor, family, r.question, image)).logits, reloaded(**batch).logits)
        answer = decode_generated(reprocessor, reloaded.generate(**batch, max_new_tokens=4, do_sample=False),
                                  batch["input_ids"].shape[1])
    answers = generated_answers(reloaded, reprocessor, records, paths, family="smolvlm")
    assert answers[0] == answer  # batched, left-padded generation agrees with the one-prompt path
    assert answer_accuracy(answers, records) == summary["held_out_accuracy"]
    labelled = encode_with_answer(reprocessor, family, r.question, r.answer, image)
    answer_labels = labelled["labels"][labelled["labels"] != -100].tolist()
    assert answer_labels[-1] == reprocessor.tokenizer.eos_token_id == reprocessor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")

