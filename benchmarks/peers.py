"""DAM beside the merges a user with calibration data would pick instead, each run by its own
implementation (issue 29): fusion-bench 0.2.33's RegMean, RegMean++, Fisher merging,
AdaMerging (layer-wise, its Llama SFT variant), WUDI, TSV-M, Iso-C and Iso-CTS, and mergekit's
task arithmetic and TIES with their weights tuned on the validation split. Every model is then
scored by `mergekit-dam compare` on the held-out split.

    pip install '.[peers]'
    python benchmarks/peers.py --lab /tmp/dam-lab --work /tmp/peers-lab
    python benchmarks/peers.py --real-model /tmp/dam-real --work /tmp/peers-real --budget-minutes 20

A setup is a base, its experts, and per skill the calibration file DAM trains on, a validation
split (prompt/answer records: what the tuned grids choose on) and a held-out split (the scores):
`--lab DIR` (a built merge lab), `--real-model DIR` (benchmarks/real_model.py's --work folder:
run that first to build the base, the data and the experts) or `--setup FILE.json` (those
fields by hand; `general` optional: {"text"} or prompt/answer records for retention).

Only glue is written here: the model pool, the data in the form each method's loader takes,
the hooks fusion-bench's generic RegMean, RegMean++ and Fisher classes leave to a model family
(they ship CLIP and GPT-2 ones; a Llama causal LM needs its own), and saving the merged model.
The merge maths and the defaults are fusion-bench's (its method configs; `PEERS` below names
each value and where it departs, and why). What every method costs is counted as the
evolution benchmark counts DAM: forward-token equivalents (forward x1, forward + backward x3)
of the real tokens each method's data loader hands out, plus wall time.

`--budget-minutes M` caps every trained method at the same wall time: DAM's `max_minutes`,
AdaMerging's steps (it stops after the step that crosses it) and the tuned grids' candidates.
Without it each runs at its defaults (a GPU: DAM's defaults take minutes on SmolLM2-135M; on two
CPU cores, 100 DAM steps take 20-40 minutes). Each method is scored as soon as it is merged.
Stages are cached: a merged model folder in --work that exists is not merged again, and a
method scored in --results (default: --work; the small files only: results.json,
results.md, compare/, DAM's reports) is neither merged nor scored again, so a setup too long for
one sitting goes on later from a results folder kept apart from the merged models (to redo a
method, delete its folder and its compare/NAME). results.json
records a fingerprint of the setup's models and data, and refuses to be continued on others.
"""

from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from helpers import dam_compute, read_report, teacher_forced_tokens, variant

from mergekit_dam import DamSettings, ModelSettings, sidecar
from mergekit_dam.lab.demo import mergekit_yaml, simple_merge_config
from mergekit_dam.tools.compare import Scorer, read_records
from mergekit_dam.training.data import tokenize

# --- the setup -------------------------------------------------------------------------


@dataclass
class Setup:
    base: str
    experts: Dict[str, str]  # skill -> expert checkpoint folder
    calibration: Dict[str, str]  # skill -> the file DAM trains on
    validation: Dict[str, str]  # skill -> prompt/answer records (the tuned grids choose on them)
    held_out: Dict[str, str]  # skill -> prompt/answer records (the scores)
    general: Optional[str] = None  # general text or chat records: retention of what no expert was tuned on

    @classmethod
    def from_lab(cls, root: str) -> "Setup":
        with open(os.path.join(root, "lab.json"), encoding="utf-8") as handle:
            manifest = json.load(handle)
        skills = manifest["skills"]
        return cls(manifest["base"], {s: e["expert"] for s, e in skills.items()}, {s: e["calibration"] for s, e in skills.items()},
                   {s: e["validation"] for s, e in skills.items()}, {s: e["held_out"] for s, e in skills.items()}, manifest["general"])

    @classmethod
    def from_real_model(cls, work: str) -> "Setup":
        """benchmarks/real_model.py's folder: base/, experts/<skill>/, data/<skill>_{train,validation,held_out}.jsonl."""
        skills = sorted(s for s in os.listdir(os.path.join(work, "experts")) if os.path.exists(os.path.join(work, "experts", s, "config.json")))
        data = lambda s, split: os.path.join(work, "data", f"{s}_{split}.jsonl")  # noqa: E731
        general = os.path.join(work, "data", "general_chat.jsonl")
        return cls(os.path.join(work, "base"), {s: os.path.join(work, "experts", s) for s in skills}, {s: data(s, "train") for s in skills},
                   {s: data(s, "validation") for s in skills}, {s: data(s, "held_out") for s in skills},
                   general if os.path.exists(general) else None)


@dataclass
class Example:
    """One calibration example as fusion-bench's loaders take it: ids and the answer's tokens
    (every token of a plain-text record: what DAM scores on it)."""

    input_ids: List[int]
    scored: List[int]  # 1 where the loss is taken

    def record(self, width: Optional[int] = None, pad: int = 0) -> dict:
        """input_ids / attention_mask / labels (-100 off the scored tokens), right-padded to `width`
        (their collator, transformers' default_data_collator, stacks and does not pad)."""
        extra = (width or len(self.input_ids)) - len(self.input_ids)
        labels = [t if s else -100 for t, s in zip(self.input_ids, self.scored)]
        return {"input_ids": torch.tensor(self.input_ids + [pad] * extra), "attention_mask": torch.tensor([1] * len(self.input_ids) + [0] * extra),
                "labels": torch.tensor(labels + [-100] * extra)}


def fingerprint(setup: Setup) -> Dict[str, str]:
    """sha256 of every file the scores depend on: each model's weights and each data split, by
    the role it plays (so that the same setup rebuilt in another folder still matches)."""
    files = {"base": sorted(glob.glob(os.path.join(setup.base, "*.safetensors")))}
    files.update({f"expert_{s}": sorted(glob.glob(os.path.join(p, "*.safetensors"))) for s, p in setup.experts.items()})
    for split in ("calibration", "validation", "held_out"):
        files.update({f"{split}_{s}": [p] for s, p in getattr(setup, split).items()})
    if setup.general:
        files["general"] = [setup.general]
    digests = {}
    for role, paths in files.items():
        digest = hashlib.sha256()
        for path in paths:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
        digests[role] = digest.hexdigest()
    return digests


@functools.lru_cache(maxsize=None)
def tokenizer_of(base: str):
    """The base's tokenizer, loaded once (the calibration, the pads and every saved model use it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def calibration_examples(setup: Setup, tokenizer) -> Dict[str, List[Example]]:
    """Each expert's calibration file, read and tokenised by DAM's own reader at DAM's defaults
    (samples, max_length, seed, answer-only scoring): the examples DAM trains on."""
    defaults = DamSettings()
    examples = {}
    for skill, path in setup.calibration.items():
        tokenized = tokenize(ModelSettings(dataset=path), tokenizer, setup.base, samples=defaults.samples,
                             max_length=defaults.max_length, seed=defaults.seed)
        examples[skill] = [Example(list(e.ids), list(e.answer) if e.answer is not None else [1] * len(e.ids)) for e in tokenized]
    return examples


class CountingDataset(torch.utils.data.Dataset):
    """A method's dataset that counts the real (unpadded) tokens its loader hands out
    (AdaMerging's: every batch it draws is a step's)."""

    def __init__(self, records: List[dict]):
        self.records, self.tokens = records, 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        self.tokens += int(record["attention_mask"].sum())
        return record


def datasets_for(examples: Dict[str, List[Example]], padded: bool, pad: int) -> Dict[str, CountingDataset]:
    """Per skill: unpadded records (a batch of one each: RegMean's hooks would count pads as
    inputs) or records padded to the skill's longest example (Fisher and AdaMerging batch them)."""
    out = {}
    for skill, items in examples.items():
        width = max(len(e.input_ids) for e in items) if padded else None
        out[skill] = CountingDataset([e.record(width, pad) for e in items])
    return out


# --- fusion-bench: the glue its generic classes leave to a model family -----------------------


def fusion_bench():
    """fusion-bench's modules, imported on first use: it is an optional extra (`.[peers]`), and
    importing it installs rich's traceback handler as sys.excepthook (fusion_bench/utils/
    rich_utils.py), which is put back."""
    hook = sys.excepthook
    try:
        import fusion_bench.method as method
        from fusion_bench.method.adamerging import llama_adamerging
        from fusion_bench.method.fisher_merging.gpt2_fisher_merging import FisherMergingAlgorithmForGPT2
        from fusion_bench.method.regmean.gpt2_regmean import RegMeanAlgorithmForGPT2
        from fusion_bench.method.regmean_plusplus.regmean_plusplus import RegMeanAlgorithmPlusPlus
        from fusion_bench.modelpool import CausalLMPool
    except ImportError as error:
        raise SystemExit(f"peers: fusion-bench is not installed ({error}): pip install '.[peers]'") from error
    finally:
        sys.excepthook = hook
    return method, llama_adamerging, FisherMergingAlgorithmForGPT2, RegMeanAlgorithmForGPT2, RegMeanAlgorithmPlusPlus, CausalLMPool


def model_pool(setup: Setup, data: Optional[Dict[str, CountingDataset]] = None):
    """A CausalLMPool of the base (`_pretrained_`) and the experts by path (every load is a
    fresh float32 copy: the methods change the models they load) with our datasets under the
    experts' names (its load_train_dataset only instantiates configs)."""
    CausalLMPool = fusion_bench()[5]

    class Pool(CausalLMPool):
        def load_train_dataset(self, name, *args, **kwargs):
            return data[name]

    pool = Pool({"_pretrained_": setup.base, **setup.experts}, tokenizer=setup.base,
                train_datasets={name: None for name in data} if data else None)
    # float32 (transformers loads a checkpoint's own dtype, often bf16: RegMean's inverse and
    # Iso's SVD need float32); sdpa: RegMean++ runs decoder layers without a mask (causal under sdpa only)
    pool.model_kwargs = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    return pool


def regmean_class():
    """fusion-bench's GPT-2 RegMean (its data loader, hooks and merge) on a Llama: linear layers
    instead of GPT-2's Conv1D, and a causal LM's forward instead of a classifier head's."""
    RegMeanAlgorithmForGPT2 = fusion_bench()[3]

    class RegMeanForCausalLM(RegMeanAlgorithmForGPT2):
        _include_module_type = [torch.nn.Linear]
        tokens = 0  # real tokens forwarded

        def on_regmean_start(self):  # GPT-2's loads sequence-classification heads
            pass

        def compute_logits(self, module, batch, task):  # the forward only fires the input hooks
            self.tokens += int(batch["attention_mask"].sum())
            return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    return RegMeanForCausalLM


def regmean_plusplus_class():
    """fusion-bench's RegMean++ on a Llama: its six model-family hooks (it ships CLIP's only).
    The Gram-matrix hook is the one of its CLIP class and of RegMean (a running mean of XᵀX)."""
    RegMeanAlgorithmPlusPlus = fusion_bench()[4]

    class RegMeanPlusPlusForCausalLM(RegMeanAlgorithmPlusPlus):
        _include_module_type = [torch.nn.Linear]

        def get_layers(self, model):
            return model.model.layers

        def merge_embedding_layer(self, models_to_merge_dict):
            # what is not in a layer: the embedding (the tied head with it) and the final norm, averaged
            # as RegMean averages every parameter it has no Gram matrix for
            states = [m.state_dict() for m in models_to_merge_dict.values()]
            names = [n for n in states[0] if not n.startswith("model.layers.")]
            return {n: torch.stack([s[n] for s in states]).mean(0) for n in names}

        def get_input_for_first_layer(self, model, train_dataset):
            self.rotary = model.model.rotary_emb
            device = next(model.parameters()).device
            count = min(len(train_dataset), self.num_regmean_examples)
            return [model.model.embed_tokens(train_dataset[i]["input_ids"][None].to(device)) for i in range(count)]

        def update_merged_params_dict(self, merged_params_dict, new_merged_params, layer_idx):
            merged_params_dict.update({f"model.layers.{layer_idx}.{name}": value for name, value in new_merged_params.items()})
            return merged_params_dict

        def layer_batches_forward(self, layer, batches_input):
            outputs = []
            for hidden in batches_input:  # one unpadded example each: no mask, causal under sdpa
                positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
                out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=self.rotary(hidden, positions))
                outputs.append(out[0] if isinstance(out, tuple) else out)
            return outputs

        def get_regmean_weights(self, model_name, layer, batches_input, linear_modules_to_merge):
            grams, rows = {}, {}

            def hook_for(name):
                def hook(module, inputs, output):
                    x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
                    xtx = x.T @ x
                    if name not in grams:
                        grams[name], rows[name] = xtx / x.shape[0], x.shape[0]
                    else:
                        grams[name] = (grams[name] * rows[name] + xtx) / (rows[name] + x.shape[0])
                        rows[name] += x.shape[0]
                return hook

            handles = [module.register_forward_hook(hook_for(name)) for name, module in linear_modules_to_merge.items()]
            try:
                self.layer_batches_forward(layer, batches_input)
            finally:
                for handle in handles:
                    handle.remove()
            return {name: gram.cpu() for name, gram in grams.items()}

    return RegMeanPlusPlusForCausalLM


def fisher_class():
    """fusion-bench's GPT-2 Fisher merging on a causal LM: its loader, its per-batch squared
    gradient of Σ √p·log p, and its merge; the "classes" are the vocabulary at each scored
    (answer) position, as an LM's predictions are (its loss is 2-D logits: [positions, vocab])."""
    FisherMergingAlgorithmForGPT2 = fusion_bench()[2]

    class FisherForCausalLM(FisherMergingAlgorithmForGPT2):
        tokens = 0  # real tokens forwarded (and backpropagated)

        def on_fisher_merging_start(self):  # GPT-2's loads classification heads
            pass

        def compute_logits(self, module, batch, task):
            self.tokens += int(batch["attention_mask"].sum())
            logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            scored = batch["labels"][:, 1:] != -100  # position t predicts token t + 1
            return logits[:, :-1][scored]

    return FisherForCausalLM


class BudgetSpent(Exception):
    pass


def adamerging_class(budget_s: Optional[float]):
    """fusion-bench's LayerWiseAdaMergingForLlamaSFT, stopped after the step that crosses
    `budget_s` (its loop has a step count only; the stop is its per-step log call, which comes
    after the step's merge, so the model is the one its next step would start from)."""
    llama_adamerging = fusion_bench()[1]

    class BudgetedAdaMerging(llama_adamerging.LayerWiseAdaMergingForLlamaSFT):
        steps_run = 0

        def train(self, causal_lm):
            started, log_dict = time.perf_counter(), self.fabric.log_dict

            def log_and_check(metrics, step=None):
                log_dict(metrics, step=step)
                self.steps_run = step + 1
                if budget_s is not None and time.perf_counter() - started > budget_s:
                    raise BudgetSpent

            self.fabric.log_dict = log_and_check
            try:
                return super().train(causal_lm)
            except BudgetSpent:
                self.save_state("latest", causal_lm)
                return causal_lm
            finally:
                self.fabric.log_dict = log_dict

    return BudgetedAdaMerging


# --- the methods -------------------------------------------------------------------------

# the embedding and the tied head: WUDI's objective and Iso-CTS's projection build
# vocabulary x vocabulary matrices for them (49152² floats for SmolLM2, ~10 GB each):
# excluded there (then averaged, as each method averages what it excludes) where noted
EMBEDDINGS = ["model.embed_tokens.weight", "lm_head.weight"]


@dataclass
class Peer:
    """A method, its settings (fusion-bench's defaults: the config file named in `defaults`)
    and what was changed, and why."""

    run: Callable  # (setup, examples, args, out) -> {"compute": float, ...}
    defaults: str
    deviations: List[str] = field(default_factory=list)


def saved(model, setup: Setup, out: str) -> None:
    """The merged model and the base's tokenizer, written whole or not at all."""
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.to("cpu").save_pretrained(partial)
    tokenizer_of(setup.base).save_pretrained(partial)
    os.replace(partial, out)


def data_free(name: str, **settings) -> Callable:
    def run(setup, examples, args, out):
        method = fusion_bench()[0]
        if name in ("WUDIMerging", "ISO_CTS_Merge") and args.exclude_embeddings:
            settings["exclude_keys"] = EMBEDDINGS
        saved(getattr(method, name)(**settings).run(model_pool(setup)), setup, out)
        return {"compute": 0.0, "settings": settings}
    return run


def regmean(setup, examples, args, out):
    data = datasets_for(examples, padded=False, pad=0)
    settings = dict(num_regmean_examples=256, exclude_param_names_regex=[], reduce_non_diagonal_ratio=0.6, weight_transpose=True,
                    cache_dir=os.path.join(out + ".work"), batch_size=1, num_workers=0)
    torch.manual_seed(args.seed)  # its loader shuffles
    algorithm = regmean_class()(**settings)
    saved(algorithm.run(model_pool(setup, data)), setup, out)
    return {"compute": float(algorithm.tokens), "settings": settings}  # forward only


def regmean_plusplus(setup, examples, args, out):
    data = datasets_for(examples, padded=False, pad=0)
    settings = dict(num_regmean_examples=256, exclude_param_names_regex=[], reduce_non_diagonal_ratio=0.95, weight_transpose=True)
    saved(regmean_plusplus_class()(**settings).run(model_pool(setup, data)), setup, out)
    # each example once through the embedding, then through every layer twice: its own model's
    # (the Gram matrices) and the merged one's (the next layer's inputs)
    tokens = sum(len(e.input_ids) for items in examples.values() for e in items[:256])
    return {"compute": 2.0 * tokens, "settings": settings}


def fisher(setup, examples, args, out):
    pad = pad_id(setup)
    data = datasets_for(examples, padded=True, pad=pad)
    settings = dict(exclude_param_names_regex=[], normalize_fisher_weight=True, minimal_fisher_weight=1e-6, num_fisher_examples=256,
                    cache_dir=out + ".work", batch_size=32, num_workers=0)
    torch.manual_seed(args.seed)
    algorithm = fisher_class()(**settings)
    saved(algorithm.run(model_pool(setup, data)), setup, out)
    return {"compute": 3.0 * algorithm.tokens, "settings": settings}  # forward + backward


def adamerging(setup, examples, args, out):
    from lightning.fabric.wrappers import _unwrap_objects

    data = datasets_for(examples, padded=True, pad=pad_id(setup))
    settings = dict(seed=args.seed, output_dir=out + ".work", optimizer="adam", lr=1e-4, sparsity_ratio=None, average_attntion=True,
                    start_layer_idx=0.3, init_values=0.5, init_weights_path=None, clamp_weights=False, normalized_merging_weights=True,
                    max_steps=args.adamerging_steps, tie_weights=True, strict=False,
                    dataloader_kwargs={"batch_size": 24, "num_workers": 0, "shuffle": True}, save_interval=None, save_merged_model=False)
    algorithm = adamerging_class(args.budget_minutes * 60 if args.budget_minutes else None)(**settings)
    saved(_unwrap_objects(algorithm.run(model_pool(setup, data))), setup, out)
    return {"compute": 3.0 * sum(d.tokens for d in data.values()), "steps": algorithm.steps_run, "settings": settings}


def pad_id(setup: Setup) -> int:
    tokenizer = tokenizer_of(setup.base)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


PEERS = {
    "regmean": Peer(regmean, "fusion_bench_config/method/regmean/gpt2_regmean.yaml (a causal text model's): 256 examples, "
                    "non-diagonal ratio 0.6", ["batch 1 instead of 32: its Gram hooks count padded positions as inputs"]),
    "regmean_plusplus": Peer(regmean_plusplus, "fusion_bench_config/method/regmean_plusplus/clip_regmean_plusplus.yaml (its only "
                             "one): 256 examples, ratio 0.95", ["batch 1 (no pads, no mask needed)",
                                                                "the final norm averaged with the embedding (CLIP's leaves its post-norm at the base)"]),
    "fisher": Peer(fisher, "fusion_bench_config/method/fisher_merging/gpt2_fisher_merging.yaml: 256 examples, batch 32, "
                   "normalised, minimum weight 1e-6", ["the classes are the vocabulary at each answer position"]),
    "adamerging": Peer(adamerging, "fusion_bench_config/method/adamerging/llama_sft.yaml: Adam lr 1e-4, 1000 steps, batch 24, "
                       "init 0.5, softmax-normalised, first 30% of layers and attention averaged",
                       ["steps capped by --budget-minutes where given (the same wall time as DAM's)"]),
    "wudi": Peer(data_free("WUDIMerging", iter_num=400), "fusion_bench_config/method/wudi/wudi.yaml: 400 iterations",
                 ["--exclude-embeddings: the embedding and head averaged (V x V matrices otherwise)"]),
    "tsvm": Peer(data_free("TaskSingularVectorMerging", alpha=1.0, exclude_keys=None, return_single_task_models=False),
                 "fusion_bench_config/method/task_singular_vector/TaskSingularVectorMerging.yaml: alpha 1"),
    "iso_c": Peer(data_free("ISO_C_Merge", scaling_factor=1.0, exclude_keys=None), "fusion_bench_config/method/isotropic_merging/iso_c.yaml: scaling 1.0"),
    "iso_cts": Peer(data_free("ISO_CTS_Merge", scaling_factor=1.0, common_space_fraction=0.8, exclude_keys=None),
                    "fusion_bench_config/method/isotropic_merging/iso_cts.yaml: scaling 1.0, common space 0.8",
                    ["--exclude-embeddings: the embedding and head averaged (V x V matrices otherwise)"]),
}

# mergekit's task arithmetic and TIES, one weight for every expert (and TIES's density) chosen
# on the validation split; coarse values first, so that a budget cut leaves a spread. TIES with
# `normalize` (mergekit's default) is the disjoint mean, where a common weight cancels out: its
# density is tuned; without it, the weight scales the sign-elected sum
GRIDS = {
    "task_arithmetic_tuned": [{"merge_method": "task_arithmetic", "base": True, "parameters": {"weight": w}}
                              for w in (0.5, 1.0, 0.3, 0.7, 0.2, 0.4, 0.6, 0.8, 0.9, 1.2)],
    "ties_tuned": [{"merge_method": "ties", "base": True, "parameters": {"weight": 1.0 if w is None else w, "density": d},
                    "top": {"normalize": w is None}}
                   for w, d in ((None, 0.5), (0.5, 0.5), (None, 0.2), (None, 0.8), (0.3, 0.5), (0.7, 0.5), (0.5, 0.2), (0.5, 0.8),
                                (1.0, 0.2), (0.3, 0.8))],
}


def validation_fitness(setup: Setup, model: str) -> tuple:
    """Mean exact match minus mean answer NLL over the skills' validation records, teacher-forced
    (the evolution benchmark's `both` fitness), and its forward tokens."""
    scorer = Scorer(model, "cuda" if torch.cuda.is_available() else "cpu")
    em, nll, tokens = [], [], 0
    for path in setup.validation.values():
        records = read_records(path)
        result = scorer.teacher_forced(records)
        em.append(result["accuracy"])
        nll.append(result["nll"])
        tokens += teacher_forced_tokens(scorer.tokenizer, [(r["prompt"], r["answer"]) for r in records])
    return sum(em) / len(em) - sum(nll) / len(nll), tokens


def tuned(grid: str) -> Callable:
    def run(setup, examples, args, out):
        started, trials, compute = time.perf_counter(), [], 0.0
        work, best = out + ".work", None
        os.makedirs(work, exist_ok=True)
        for index, spec in enumerate(GRIDS[grid]):
            if args.budget_minutes and index and time.perf_counter() - started > args.budget_minutes * 60:
                break
            candidate = os.path.join(work, str(index))
            config = simple_merge_config(spec, setup.base, list(setup.experts.values()))
            mergekit_yaml(config, candidate + ".yml", candidate, quiet=True, options=["--cuda"] if torch.cuda.is_available() else [])
            fitness, tokens = validation_fitness(setup, candidate)
            compute += tokens
            trials.append({"spec": spec, "fitness": fitness})
            print(f"  {grid} {spec['parameters']} {spec.get('top', '')}: validation fitness {fitness:.4f}", flush=True)
            if best is None or fitness > trials[best]["fitness"]:
                if best is not None:
                    shutil.rmtree(os.path.join(work, str(best)))
                best = index
            else:
                shutil.rmtree(candidate)  # one candidate on disk at a time, besides the best
        os.replace(os.path.join(work, str(best)), out)
        return {"compute": compute, "chosen": trials[best]["spec"], "trials": trials}
    return run


def dam(setup, examples, args, out, extra: Optional[dict] = None):
    """DAM at the package defaults (and --dam's settings; `extra`: a --dam-run's)."""
    artifact = out + ".safetensors"
    settings = {"seed": args.seed, **dict(variant(f"dam:{','.join(args.dam)}")[1]), **(extra or {})}
    if args.budget_minutes:
        settings.setdefault("max_minutes", args.budget_minutes)
    config = {"merge_method": "dam", "base_model": setup.base, "dtype": "float32",
              "models": [{"model": setup.experts[s], "parameters": {"dataset": setup.calibration[s]}} for s in setup.experts],
              "parameters": {"coefficients": artifact, **settings}}
    mergekit_yaml(config, out + ".yml", out, quiet=True, options=["--cuda"] if torch.cuda.is_available() else [])
    report = read_report(artifact)
    return {"compute": dam_compute(report), "settings": settings, "steps": len(report.get("loss_curve", [])), "resolved": report.get("resolved")}


METHODS: Dict[str, Callable] = {"dam": dam, **{name: peer.run for name, peer in PEERS.items()}, **{name: tuned(name) for name in GRIDS}}


# --- scoring and the table -------------------------------------------------------------------


def compare(setup: Setup, models: Dict[str, str], results: Dict[str, dict], out: str) -> dict:
    """`mergekit-dam compare` on the held-out splits: the same scoring as every other table. One
    run per model, each kept in out/<name>/compare.json, so that an interrupted scoring resumes
    where it stopped (13 models take over half an hour on two CPU cores); the retention against the
    base and the experts is then compare's own `add_retention` over them all. Without the
    experts' KL (`--expert`), which the table does not show: it is two more forwards of every
    held-out record per model, about 40% of the scoring's time."""
    from mergekit_dam.tools.compare import Suite, add_retention, write_outputs

    scores = {}
    for name, path in models.items():
        done = os.path.join(out, name, "compare.json")
        if not os.path.exists(done):
            compute = results.get(name, {}).get("compute")
            shutil.rmtree(os.path.join(out, name + ".tmp"), ignore_errors=True)  # a stopped run's half-written scores
            command = [sys.executable, "-m", "mergekit_dam.cli", "compare", f"{name}={path}", "--out", os.path.join(out, name + ".tmp"),
                       "--quiet", *[a for s, p in setup.held_out.items() for a in ("--skill", f"{s}={p}")],
                       *(["--general", setup.general] if setup.general else []),
                       *(["--compute", f"{name}={compute}"] if compute is not None else [])]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)  # its table is in ours
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
            os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
        with open(done, encoding="utf-8") as handle:
            scores[name] = json.load(handle)[name]
    add_retention(scores, models, Suite(skills=setup.held_out, experts=setup.experts, general=setup.general, base=setup.base))
    write_outputs(scores, out)
    return scores


def table(setup: Setup, scores: dict, results: Dict[str, dict]) -> str:
    """Per model: each skill's exact match and answer NLL, their means, NLL retention (the share of
    each expert's NLL gain over the base kept), general NLL with its retention (the base's NLL
    over the model's: 1.0 = the base's own), compute and wall time."""
    skills = list(setup.held_out)
    base_general = scores.get("base", {}).get("general_nll")
    head = "| model | " + " | ".join(f"{s} EM / NLL" for s in skills) + " | mean EM | NLL retention | general NLL (retention) | compute (fwd tokens) | wall s |"
    lines = [head, "|" + "---|" * (len(skills) + 6)]
    lines += [f"| {name} | failed: {result['error']} |" for name, result in results.items() if "error" in result]
    for name, entry in scores.items():
        cells = [f"{entry[s]['accuracy']:.2f} / {entry[s]['nll']:.3f}" for s in skills]
        mean = sum(entry[s]["accuracy"] for s in skills) / len(skills)
        retention = entry.get("retention", {})
        nll_retention = [retention[s]["nll"] for s in skills if "nll" in retention.get(s, {})]
        result = results.get(name, {})
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.2f} | "
                     + (f"{sum(nll_retention) / len(nll_retention):.2f}" if nll_retention else "") + " | "
                     + (f"{entry['general_nll']:.3f}" + (f" ({base_general / entry['general_nll']:.2f})" if base_general else "")
                        if "general_nll" in entry else "") + " | "
                     + (f"{result['compute']:.3g}" if "compute" in result else "") + " | "
                     + (f"{result['seconds']:.0f}" if "seconds" in result else "") + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--lab", help="a merge lab's folder (mergekit-dam lab)")
    where.add_argument("--real-model", help="benchmarks/real_model.py's --work folder")
    where.add_argument("--setup", help="a JSON file with base, experts, calibration, validation, held_out (and general)")
    parser.add_argument("--work", required=True, help="where merged models, results.json and results.md go")
    parser.add_argument("--results", help="where results.json, results.md, compare/ and DAM's reports go (default: --work): "
                        "keep it to go on later without the merged models")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--budget-minutes", type=float, help="the wall time of every trained method (DAM, AdaMerging, the tuned grids)")
    parser.add_argument("--dam", action="append", default=[], metavar="key=value", help="a DAM setting over the package defaults")
    parser.add_argument("--dam-run", action="append", default=[], metavar="NAME:key=value,...",
                        help="one more DAM merge, NAME, with these settings over the defaults (and --dam's); "
                             "it runs when NAME is in --methods, e.g. dam_retain:retain_dataset=/abs/general.jsonl")
    parser.add_argument("--adamerging-steps", type=int, default=1000, help="AdaMerging's max_steps (its default: 1000)")
    parser.add_argument("--exclude-embeddings", action="store_true", help="WUDI and Iso-CTS leave the embedding and head averaged "
                        "(their vocabulary-squared matrices do not fit a CPU machine's memory at a real vocabulary)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strict", action="store_true", help="stop at the first method that fails (default: record it, go on)")
    args = parser.parse_args(argv)
    args.runs = dict(variant(text) for text in args.dam_run)
    unknown = set(args.methods.split(",")) - set(METHODS) - set(args.runs)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}: pick from {', '.join(METHODS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup = (Setup.from_lab(args.lab) if args.lab else Setup.from_real_model(args.real_model) if args.real_model
             else Setup(**json.load(open(args.setup, encoding="utf-8"))))
    examples = calibration_examples(setup, tokenizer_of(setup.base))
    kept = args.results or args.work
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(kept, exist_ok=True)
    results_path, scores_dir = os.path.join(kept, "results.json"), os.path.join(kept, "compare")
    recorded = json.load(open(results_path, encoding="utf-8")) if os.path.exists(results_path) else {}
    prints = fingerprint(setup)
    differ = sorted(k for k, v in recorded.get("fingerprint", prints).items() if prints.get(k) != v)
    if differ:
        sys.exit(f"peers: {results_path} was measured on other files ({', '.join(differ)} differ): "
                 "pass another --results folder, or delete that one to start again")
    results = recorded.get("methods", {})
    models = {"base": setup.base, **{f"expert_{s}": p for s, p in setup.experts.items()}}
    scored = lambda name: name in results and os.path.exists(os.path.join(scores_dir, name, "compare.json"))  # noqa: E731
    models.update({name: os.path.join(args.work, name) for name in results if scored(name)})
    compare(setup, models, results, scores_dir)  # the base and the experts first: every retention needs them
    for name in args.methods.split(","):
        out = os.path.join(args.work, name)
        if not scored(name) and not os.path.exists(os.path.join(out, "config.json")):
            shutil.rmtree(out + ".work", ignore_errors=True)
            shutil.rmtree(os.path.join(scores_dir, name), ignore_errors=True)  # a new merge's old score
            started = time.perf_counter()
            try:
                method = functools.partial(dam, extra=args.runs[name]) if name in args.runs else METHODS[name]
                results[name] = {**method(setup, examples, args, out), "seconds": time.perf_counter() - started}
            except Exception as error:  # noqa: BLE001 -- one method's failure is a result; the others still run
                if args.strict:
                    raise
                traceback.print_exc()
                results[name] = {"error": f"{type(error).__name__}: {error}"[:500], "seconds": time.perf_counter() - started}
                print(f"{name}: failed after {results[name]['seconds']:.1f} s: {results[name]['error']}", flush=True)
            else:
                print(f"{name}: {results[name]['seconds']:.1f} s, {results[name]['compute']:.3g} forward-token equivalents", flush=True)
                report = sidecar(out + ".safetensors", "report")
                if os.path.exists(report):  # DAM's: the coefficients' training, kept with the scores
                    shutil.copyfile(report, os.path.join(kept, f"{name}.report.json"))
            write(results_path, {"setup": asdict(setup), "fingerprint": prints, "methods": results})
        if os.path.exists(os.path.join(out, "config.json")) or scored(name):
            models[name] = out
            compare(setup, models, results, scores_dir)  # scored now: a later stop keeps it
    scores = compare(setup, models, results, scores_dir)
    summary = {"setup": asdict(setup), "fingerprint": prints, "methods": results, "scores": scores, "budget_minutes": args.budget_minutes,
               "defaults": {n: {"defaults": p.defaults, "deviations": p.deviations} for n, p in PEERS.items()}}
    write(results_path, summary)
    markdown = table(setup, scores, results)
    with open(os.path.join(kept, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown)
    print(markdown)
    return summary


def write(path: str, content: dict) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
