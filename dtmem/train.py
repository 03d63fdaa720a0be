"""Training a Decision Transformer on a Minari dataset, with periodic evaluation."""

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from dtmem.checkpoints import read_checkpoint, save_checkpoint
from dtmem.data import Episodes, WindowSampler, dataset_reference, find_dataset
from dtmem.errors import Interrupted, UserError
from dtmem.files import provenance
from dtmem.limits import check, check_memory
from dtmem.memory import PolicySpec
from dtmem.model import DecisionTransformer, DTConfig
from dtmem.results import summarize
from dtmem.rollout import rollout
from dtmem.runtime import pick_device, progress_bar
from dtmem.tasks import resolve_task


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored in its checkpoint."""

    task: str = "hopper-medium"
    """task to train on (see `dtmem data list`)"""
    steps: int = 2000
    """gradient updates (the field uses 100k; our CPUs afford far fewer)"""
    batch_size: int = 64
    """windows per update"""
    lr: float = 1e-4
    """AdamW learning rate after warmup"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    warmup_steps: int = 1000
    """linear warmup; the field's 10k assumes 100k updates, so ours is shorter"""
    grad_clip: float = 0.25
    """gradient-norm clip"""
    context_steps: int = 20
    """K, timesteps per training window"""
    n_layer: int = 3
    """transformer blocks"""
    n_head: int = 1
    """attention heads"""
    n_embd: int = 128
    """embedding width"""
    dropout: float = 0.1
    """dropout everywhere, as in the reference"""
    bf16: bool = False
    """bfloat16 autocast (CPU or CUDA): 1.35x (2 threads) to 1.55x (1 thread) the fp32
    updates/s here (`dtmem bench train`)"""
    fused_adamw: bool = False
    """AdamW's fused kernel, one pass over all parameters: with bf16, 1.4x (2 threads) to
    1.6x (1 thread) fp32's updates/s here"""
    seed: int = 0
    """seeds torch and the window sampler"""
    dataset: str = ""
    """any Minari dataset id to train on (default: the task's own, its local build first)"""
    eval_every: int = 1000
    """updates between evaluations (0: only at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation, env seeds 0..n-1 every time"""
    eval_policy: str = "recompute"
    """memory policy of the evaluations"""
    checkpoint_every: int = 500
    """updates between checkpoint saves"""


LOG_EVERY = 10  # updates between lines of the training log


def log_path(checkpoint):
    """The training log beside a checkpoint: runs/dt/x.pt -> runs/dt/x-log.jsonl."""
    return Path(checkpoint).with_name(Path(checkpoint).stem + "-log.jsonl")


class TrainingLog:
    """JSON lines beside the checkpoint: the loss and learning rate every LOG_EVERY updates,
    each evaluation's score with its CI. A resumed run first drops the lines written after
    the checkpoint it resumes from, so the log reads as one uninterrupted run."""

    def __init__(self, path, after_step):
        self.path = Path(path)
        lines = self.path.read_text().splitlines() if after_step and self.path.exists() else []
        # Written at the first new line, so a run that fails before it leaves no file.
        self.pending = [line for line in lines if json.loads(line)["step"] <= after_step]

    def write(self, row):
        lines = [*self.pending, json.dumps(row)] if self.pending is not None else [json.dumps(row)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w" if self.pending is not None else "a") as f:
            f.write("".join(line + "\n" for line in lines))
        self.pending = None


def update(model, optimizer, batch, grad_clip, bf16=False, device="cpu"):
    """One gradient update: the masked MSE of the actions predicted at the state tokens,
    gradients clipped by norm, an AdamW step. Returns the loss. A non-finite loss or
    gradient raises FloatingPointError before the step, so the weights stay finite."""
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        pred = model(batch["rtg"], batch["states"], batch["actions"], batch["timesteps"])
    mask = batch["mask"][..., None]
    loss = (((pred.float() - batch["actions"]) ** 2) * mask).sum() / (
        mask.sum() * pred.shape[-1])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
        raise FloatingPointError(f"the loss is {loss.item()} and the gradient norm "
                                 f"{grad_norm.item()}")
    optimizer.step()
    return loss


RESUME_MAY_CHANGE = ("steps", "checkpoint_every")


def resumable(out, cfg: TrainConfig):
    """The checkpoint at `out`, if training can resume from it with `cfg`."""
    if not out.exists():
        raise UserError(f"nothing to resume: {out} does not exist; drop --resume to start "
                        "a new run")
    saved = read_checkpoint(out)
    state = saved["training_state"]
    if state is None:
        raise UserError(f"{out} holds no training state (shipped and imported checkpoints keep none); "
                        "write to another --out")
    if cfg.steps < saved["steps"]:
        raise UserError(f"{out} has {saved['steps']} updates already; give --steps "
                        f"{saved['steps']} or more to resume it")
    # More --steps extends a training (the learning rate is constant after warmup, so the
    # updates are those of a run asked for more from the start), and how often it saves
    # changes no update; every other setting must be the checkpoint's.
    now = {k: v for k, v in asdict(cfg).items() if k not in RESUME_MAY_CHANGE}
    changed = [f"{k} {state['config'].get(k)!r} there, {v!r} now" for k, v in now.items()
               if state["config"].get(k) != v]
    if changed:
        raise UserError(f"{out} was made with other settings ({'; '.join(changed)}); resume "
                        "with its settings or write to another --out")
    return saved


def segment(made, first_step, last_step):
    """One run of train() within a training: its updates and what it ran on."""
    return {"steps": [first_step, last_step], "commit": made["commit"], "date": made["date"],
            "machine": made["machine"]}


def train(cfg: TrainConfig, out, resume=False, device="auto", download=False, progress=True):
    """Train (or resume) and save the checkpoint at `out`. Returns the metrics history."""
    check(cfg)
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n-embd {cfg.n_embd} must be a multiple of --n-head {cfg.n_head}")
    # Weights, gradients and AdamW's two moments: 4 copies of 12 L d^2 floats; activations
    # of a batch (about 20 floats per token, width and layer); and attention, quadratic in
    # the window: with dropout, CPU attention keeps scores, probabilities, the dropout mask
    # and their gradients, about 6 floats per query-key pair, head, layer and batch row.
    tokens = 3 * cfg.context_steps
    check_memory(4 * 4 * 12 * cfg.n_layer * cfg.n_embd**2
                 + 4 * 20 * cfg.batch_size * tokens * cfg.n_embd * cfg.n_layer
                 + 4 * 6 * cfg.batch_size * cfg.n_head * tokens**2 * cfg.n_layer,
                 f"a {cfg.n_layer}-layer, {cfg.n_embd}-wide DT of K = {cfg.context_steps} "
                 f"at batch {cfg.batch_size}",
                 "choose a smaller --context-steps, --n-embd, --n-layer or --batch-size")
    out = Path(out)
    saved = resumable(out, cfg) if resume else None  # before the dataset is read
    device = pick_device(device)
    task = resolve_task(task=cfg.task)
    eval_spec = PolicySpec(cfg.eval_policy)
    eval_spec.build(cfg.context_steps, 3 * task.max_episode_steps, task.name)  # fails now
    dataset, dataset_id = find_dataset(task, download, cfg.dataset)
    reference = dataset_reference(dataset, dataset_id)
    if reference:  # scores against the dataset's own references, where it has them
        task = replace(task, ref_min=reference["min"], ref_max=reference["max"],
                       ref_source=reference["source"])
    episodes = Episodes.from_minari(dataset)
    state_mean, state_std = episodes.state_stats()
    sampler = WindowSampler(episodes, cfg.context_steps, task.return_scale, state_mean,
                            state_std, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = DecisionTransformer(DTConfig(
        state_dim=episodes.states.shape[1], act_dim=episodes.actions.shape[1],
        context_steps=cfg.context_steps, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_embd=cfg.n_embd, dropout=cfg.dropout, max_timestep=task.max_episode_steps)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=cfg.fused_adamw or None)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / cfg.warmup_steps))
    step, history, wall = 0, [], 0.0

    if saved:
        state = saved["training_state"]
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        sampler.rng.bit_generator.state = state["sampler_rng"]
        step, history, wall = saved["steps"], saved["metrics"]["history"], state["wall"]
    # A long training spans sessions and machines, and its floats depend on each one's CPU:
    # the checkpoint names every run that made it (a checkpoint from before segments were
    # recorded counts as one segment, from an unknown first step, by its last provenance).
    earlier = (saved["provenance"].get("segments")
               or [segment(saved["provenance"], None, saved["steps"])]) if saved else []
    first_step = step

    log = TrainingLog(log_path(out), after_step=step)

    def save():
        made = provenance(train_config=asdict(cfg), device=device, wall_seconds=round(wall, 1))
        made["segments"] = earlier + [segment(made, first_step, step)]
        save_checkpoint(
            out, model, task=task.name, dataset_id=dataset_id, state_mean=state_mean,
            state_std=state_std, steps=step, provenance=made,
            metrics={"history": history},
            training_state={"config": asdict(cfg), "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict(), "torch_rng": torch.get_rng_state(),
                            "sampler_rng": sampler.rng.bit_generator.state, "wall": wall},
            reference=reference)

    def evaluate():
        model.eval()
        policy = eval_spec.build(cfg.context_steps, 3 * task.max_episode_steps)
        results, _ = rollout(model, state_mean, state_std, task, policy,
                             episodes=cfg.eval_episodes, seed=0)
        model.train()
        summary = summarize(results)
        history.append({"step": step, "score": summary["mean_score"],
                        "return": summary["mean_return"], "wall": round(wall, 1)})
        log.write({"step": step, "score": summary["mean_score"],
                   "score_ci95": summary["score_ci95"], "return": summary["mean_return"],
                   "episodes": cfg.eval_episodes, "policy": cfg.eval_policy})
        return summary

    model.train()
    bar = progress_bar(total=cfg.steps, initial=step, desc=f"train {task.name}",
                       show=progress)
    try:
        while step < cfg.steps:
            begin = time.perf_counter()
            batch = {k: v.to(device) for k, v in sampler.sample(cfg.batch_size).items()}
            try:
                loss = update(model, optimizer, batch, cfg.grad_clip, cfg.bf16, device)
            except FloatingPointError as e:
                raise UserError(f"training diverged at update {step + 1}: {e}; nothing of "
                                "that update was saved; lower --lr or check the dataset") from None
            schedule.step()
            step += 1
            wall += time.perf_counter() - begin
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % LOG_EVERY == 0 or step == cfg.steps:
                log.write({"step": step, "loss": loss.item(),
                           "lr": schedule.get_last_lr()[0], "wall": round(wall, 2)})
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                bar.write(f"step {step}: normalised score {evaluate()['mean_score']:.1f}")
            if step % cfg.checkpoint_every == 0:
                save()
    except KeyboardInterrupt:
        save()
        raise Interrupted(f"the checkpoint of update {step} is saved in {out}; continue with "
                          "the same command and --resume") from None
    bar.close()
    summary = evaluate()
    save()
    if progress:
        print(f"final normalised score {summary['mean_score']:.1f} "
              f"(95% CI {summary['score_ci95'][0]:.1f}..{summary['score_ci95'][1]:.1f}) "
              f"over {cfg.eval_episodes} episodes; checkpoint {out}")
    return history
