"""``MetaLearner``: the one LightningModule of the few-shot algorithms.

What each piece owns:

- :class:`~lit_meta.algorithms.meta_module.MetaModule` (its base): the outer loop's options
  (meta-optimizer, learning rate and schedule, task weighting, clipping, the divergence
  guard) and what every lit_meta model does under a Trainer: ``MetaStep``, logging
  steps, evaluation epochs, checkpoints.
- ``MetaLearner`` (here): the network (built from the data's ``task_spec``), the options of
  the inner loop and of evaluation, shared by every algorithm and stated once here, and the
  hooks of one episode with MAML's behaviour. ``training_step`` and the evaluation steps
  build the batch's :class:`~lit_meta.episode.EpisodeContext` and pass it down; nothing
  about the step or split in progress is stored on the module or a layer.
- :mod:`lit_meta.episode`: the per-episode computation that calls the hooks, ``vmap``-ed
  over a batch.
- An algorithm (maml.py, anil.py, ...): a subclass that overrides only the hooks that
  differ, and states only its own options (a shared option it re-states is one whose
  default it changes); ``MetaLearner`` takes every other through ``**kwargs``, which
  LightningCLI follows, so ``--model.init_args.<shared option>`` reaches every algorithm.

Evaluation reports the mean and 95% CI over the fixed test tasks (:mod:`lit_meta.metrics`),
and on the test tasks the metric after every inner step (``test/acc_by_step`` /
``test/mse_by_step``).

Options where the authors' code differs from lit_meta's first choices (each default keeps
the first behaviour, so old checkpoints and configs behave as before; the paper configs
set the reference values and say so in their headers):

- ``inner_loss_reduction`` / ``meta_loss_reduction``: ``mean`` cross-entropy, or
  ``sum_over_shots``: Σ over the examples of CE / K, K the shots per class, which is
  cbfinn/maml's ``xent`` (``softmax_cross_entropy_with_logits / update_batch_size``, summed
  by ``tf.gradients`` and ``reduce_sum``). For N-way episodes the inner loss is then N × the
  mean (so α = 0.4 there is α = 2.0 on the mean), and the meta-loss (n_query / K) × the
  mean, which Adam's update does not see (up to its ε) but a gradient clip does.
  Regression keeps the mean (cbfinn/maml's ``mse`` is a mean).
- ``adapt_bn``: whether BatchNorm's weight and bias adapt in the inner loop (cbfinn/maml and
  HowToTrainYourMAMLPytorch keep them out of the inner loop; the outer loop learns them).
- ``transductive``: ``true`` (the query batch's own statistics), ``false`` (each query
  example beside the support set, Nichol et al. 2018) or ``support`` (the query normalised
  with the support set's statistics, Ravi & Larochelle 2017's test-time batch norm).
- ``inner_batch_size`` / ``eval_inner_batch_size``: each inner step trains on a mini-batch
  of that many support examples, drawn per step without replacement within a pass (Reptile's
  ``_mini_batches``); null: the whole support set every step.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lit_meta.algorithms.meta_module import MetaModule
from lit_meta.compile import TaskCompiler
from lit_meta.episode import EpisodeContext, adapt_task, inner_schedule, outer_update_in_chunks, run_tasks
from lit_meta.inner import Adapted, Params
from lit_meta.inner_checkpoint import recompute_problem
from lit_meta.internals import attached_trainer
from lit_meta.metrics import mean_ci95, moments
from lit_meta.models import build_network
from lit_meta.models.layers import BATCH, Norm, PerStepBatchNorm
from lit_meta.tasks import TaskBatch
from lit_meta.update_rules import SGD, UpdateRule

LOSS_REDUCTIONS = ("mean", "sum_over_shots")
ADAPT_SCOPES = ("all", "head", "body")
TRANSDUCTIVE = {True: "transductive", False: "per_example", "support": "support"}
BN_NAMES = {"transductive": "transductive", "per_example": "non-transductive", "support": "support statistics",
            "running": "per-step running statistics"}


class MetaLearner(MetaModule):
    """A few-shot meta-learning algorithm: MAML as it stands; the others override hooks.

    Hooks an algorithm may override (MAML overrides none but ``algorithm_name``); each gets
    the episode's ``ctx`` (:class:`~lit_meta.episode.EpisodeContext`) where it may depend on it:

    - what adapts: ``fixed_adapt`` (ANIL: ``"head"``, BOIL: ``"body"``: the only ``adapt`` scope
      the algorithm takes), ``adapt_names()``, ``inner_params()``;
    - how it adapts: ``update_rule(ctx)`` (Meta-SGD, MAML++, Reptile, Meta-LSTM),
      ``initial_rule_state(ctx)`` (Reptile: the inner Adam state carried across
      meta-steps), ``first_order_at(ctx)`` (MAML++: derivative-order annealing, from the
      context's epoch), ``support_loss_fn`` (Meta-LSTM: the gradient divided by the batch size
      again), ``inner_batch_size_of(ctx)``;
    - what a task contributes: ``trace_inner(ctx)``, ``query_objective(...)`` (MAML++:
      multi-step loss), ``extra_task_outputs(...)`` and ``absorb_task_outputs(out)`` (MAML++:
      per-step BN statistics out of vmap, into the buffers; Reptile: the inner Adam state),
      ``predict(...)``, ``evaluation_bn()`` (MAML++: BNRS's per-step running statistics at
      non-transductive evaluation) and ``query_step(step)`` (MAML++: the per-step BN slot the
      query reads), ``forward_fn``, ``loss_fn``, ``accuracy``;
    - the inner objective and the meta-gradient: ``inner_penalty(...)`` and ``task_gradient(...)``
      (iMAML: the proximal term, the implicit gradient by conjugate gradient);
    - the network: ``backbone_options()`` (MAML++: per-step BatchNorm; ProtoNet, R2D2: no head);
    - the meta-step: ``outer_update(batch, ctx)`` (Reptile, Transfer);
    - loading: ``before_load_state(state_dict)`` (Transfer: its classifier, sized by the data);
    - adaptation to a new task (``lit_meta.adapt``): ``set_inner_lr(lr)`` (Meta-SGD, MAML++:
      the learned rates; Meta-LSTM: refuses), ``resize_head(ways)`` (Meta-SGD: the head's rates;
      BOIL: the meta-learned head's first rows) and ``resized_head_note(ways)``;
    - reporting: ``algorithm_name`` (MAML: fomaml when first order), ``results_extra()``,
      ``monitor``, ``meta_parameters()``, ``divergence_cause(step, batch)``.

    No algorithm overrides a Lightning hook or a private method.
    """

    fixed_adapt: str | None = None

    def __init__(
        self,
        task_spec: dict[str, Any],
        backbone: str = "auto",
        backbone_kwargs: dict[str, Any] | None = None,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        meta_batch_size: int = 4,
        task_chunk_size: int | None = None,
        transductive: bool | str = True,
        inner_checkpointing: bool = False,
        compile_tasks: str | None = None,
        inner_loss_reduction: str = "mean",
        meta_loss_reduction: str = "mean",
        adapt_bn: bool = True,
        inner_batch_size: int | None = None,
        eval_inner_batch_size: int | None = None,
        adapt: str = "all",
        **kwargs: Any,
    ) -> None:
        """The inner loop's and evaluation's options; ``kwargs``: the outer loop's
        (``MetaModule``: meta_optimizer, meta_lr, lr_schedule, min_lr, weighting, grad_clip,
        grad_clip_value, max_nonfinite)."""
        if inner_steps < 0 or (eval_inner_steps is not None and eval_inner_steps < 0):
            raise ValueError(f"inner_steps/eval_inner_steps must be >= 0, got {inner_steps}/{eval_inner_steps}")
        if inner_lr <= 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
        if meta_batch_size < 1:
            raise ValueError(f"meta_batch_size must be >= 1, got {meta_batch_size}")
        if task_chunk_size is not None and task_chunk_size < 1:
            raise ValueError(f"task_chunk_size must be >= 1 or null, got {task_chunk_size}")
        for option, value in (("inner_loss_reduction", inner_loss_reduction),
                              ("meta_loss_reduction", meta_loss_reduction)):
            if value not in LOSS_REDUCTIONS:
                raise ValueError(f"{option} must be one of {LOSS_REDUCTIONS}, got {value!r}")
        if adapt not in ADAPT_SCOPES:
            raise ValueError(f"adapt must be one of {ADAPT_SCOPES}, got {adapt!r}")
        if self.fixed_adapt is not None and adapt != self.fixed_adapt:  # ANIL, BOIL: the scope is the algorithm
            name = type(self).__name__
            raise ValueError(f"{name} adapts the {self.fixed_adapt} only (adapt: {self.fixed_adapt}), got adapt: "
                             f"{adapt}; MAML with adapt: {adapt} is that algorithm")
        if transductive not in TRANSDUCTIVE:
            raise ValueError(f"transductive must be true, false or 'support', got {transductive!r}")
        for option, value in (("inner_batch_size", inner_batch_size), ("eval_inner_batch_size", eval_inner_batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{option} must be an integer >= 1 or null, got {value!r}")
        super().__init__(task_spec, **kwargs)
        self.save_hyperparameters()
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.first_order = first_order
        self.meta_batch_size = meta_batch_size
        # the network last: backbone_options() may read the options above
        self.net = build_network(backbone, task_spec, **{**(backbone_kwargs or {}), **self.backbone_options()})
        # what the inner loop adapts: everything (MAML), the head only (ANIL) or the body only (BOIL)
        self.adapt_scope = adapt
        if adapt != "all" and getattr(self.net, "head", None) is None:
            raise ValueError(f"adapt: {adapt} needs a backbone with a `head` module; {type(self.net).__name__} has "
                             "none")
        # Tasks adapted (and, in training, back-propagated) together. None: the whole
        # meta-batch in one vmap, fastest; k: peak memory of k tasks' graphs, same gradient.
        self.task_chunk_size = task_chunk_size
        # Steps along the inner loop: keep only each step's parameters and recompute a
        # second-order step in the outer backward; the same gradient, memory flat in steps.
        self.inner_checkpointing = inner_checkpointing
        # How evaluation normalises the query (the module docstring): transductive (the MAML
        # papers), each example beside the support set (Reptile), or the support set's statistics.
        self.bn_mode = TRANSDUCTIVE[transductive]
        self.transductive = self.bn_mode == "transductive"
        # torch.compile of the paths with no backward through the inner gradients (lit_meta.compile)
        self.task_compiler = TaskCompiler(compile_tasks)
        self.regression = task_spec["kind"] == "regression"
        self.inner_loss_reduction, self.meta_loss_reduction = inner_loss_reduction, meta_loss_reduction
        self.adapt_bn = adapt_bn
        self.inner_batch_size, self.eval_inner_batch_size = inner_batch_size, eval_inner_batch_size
        self.curves: dict[str, list[float]] = {}  # test/acc_by_step and friends, after a test epoch

    # ------------------------------------------------------------------ the network
    def backbone_options(self) -> dict[str, Any]:
        """More options of the network, beside the config's ``backbone_kwargs`` (MAML++: its
        per-step BatchNorm). Called once, while ``__init__`` builds the network."""
        return {}

    # ------------------------------------------------------------------ the context of a batch
    def context(self, training: bool, batch: TaskBatch | None = None) -> EpisodeContext:
        """The :class:`~lit_meta.episode.EpisodeContext` of ``batch``: where its tasks come from
        (its origin), how evaluation normalises, and the inner loop's precision."""
        trainer = attached_trainer(self)
        fp32 = trainer is not None and str(trainer.precision).startswith("16")
        bn = "transductive" if training else self.evaluation_bn()
        if batch is None:
            return EpisodeContext(training=training, split="train" if training else "adapt", bn=bn, inner_fp32=fp32)
        return EpisodeContext.of(batch, training, bn=bn, inner_fp32=fp32)

    def evaluation_bn(self) -> str:
        """How evaluation normalises the query (``lit_meta.episode.BN_MODES``): ``transductive``."""
        return self.bn_mode

    # ------------------------------------------------------------------ what adapts, and how
    def adapt_names(self) -> list[str]:
        """Names (in ``inner_params``) that the inner loop adapts: all (MAML), the head's (``adapt:
        head``, ANIL) or the body's (``adapt: body``, BOIL); BatchNorm's weight and bias only
        with ``adapt_bn``."""
        frozen = set() if self.adapt_bn else self.norm_parameter_names()
        in_scope = {"all": lambda n: True, "head": lambda n: n.startswith("head."),
                    "body": lambda n: not n.startswith("head.")}[self.adapt_scope]
        return [n for n, _ in self.net.named_parameters() if n not in frozen and in_scope(n)]

    def norm_parameter_names(self) -> set[str]:
        """The network's BatchNorm weights and biases."""
        return {f"{m}.{p}" for m, module in self.net.named_modules() if isinstance(module, PerStepBatchNorm)
                for p, _ in module.named_parameters(recurse=False)}

    def inner_params(self) -> Params:
        return dict(self.net.named_parameters())

    def update_rule(self, ctx: EpisodeContext) -> UpdateRule:
        return SGD(self.inner_lr)

    def initial_rule_state(self, ctx: EpisodeContext) -> Any:
        """The update rule's state at the first inner step of every task; None: the rule's fresh one."""
        return None

    def first_order_at(self, ctx: EpisodeContext) -> bool:
        return self.first_order or not ctx.training

    def inner_batch_size_of(self, ctx: EpisodeContext) -> int | None:
        """Support examples per inner step (``inner_batch_size`` / ``eval_inner_batch_size``), or None: all."""
        return self.inner_batch_size if ctx.training else self.eval_inner_batch_size

    # ------------------------------------------------------------------ what one task computes
    def forward_fn(self, params: Params, x: Tensor, step: int = 0, norm: Norm = BATCH) -> Tensor:
        buffers = dict(self.net.named_buffers())
        return functional_call(self.net, (params, buffers), (x,), {"step": step, "norm": norm})

    def inner_norm(self, ctx: EpisodeContext) -> Norm:
        """How the inner loop's support forwards normalise: the support batch's statistics, or
        with ``ctx.bn == "running"`` the per-step running statistics, as every forward of such
        an evaluation episode does (MAML++'s BNRS at non-transductive evaluation)."""
        return Norm(running=True) if ctx.bn == "running" else BATCH

    def loss_fn(self, prediction: Tensor, target: Tensor) -> Tensor:
        if self.regression:
            return F.mse_loss(prediction, target)
        return F.cross_entropy(prediction, target)

    def support_loss_fn(self, prediction: Tensor, target: Tensor) -> Tensor:
        """The inner loop's loss on (a mini-batch of) the support set: ``loss_fn``, or with
        ``inner_loss_reduction: sum_over_shots`` Σ CE / K (cbfinn/maml's scale)."""
        loss = self.loss_fn(prediction, target)
        if self.inner_loss_reduction == "mean" or self.regression:
            return loss
        return loss * target.shape[0] / self.shots_per_class(target)

    def meta_loss_scale(self, support_y: Tensor, query_y: Tensor) -> Tensor | float:
        """What the per-task meta-objective is multiplied by: 1, or with ``meta_loss_reduction:
        sum_over_shots`` n_query / K (cbfinn/maml: Σ over the query of CE / K)."""
        if self.meta_loss_reduction == "mean" or self.regression:
            return 1.0
        return query_y.shape[0] / self.shots_per_class(support_y)

    @staticmethod
    def shots_per_class(labels: Tensor) -> Tensor:
        """K of a balanced N-way K-shot support set: how many examples share the first one's
        class (a tensor: no host sync, and it works inside ``vmap``)."""
        return (labels == labels[0]).sum()

    def accuracy(self, prediction: Tensor, target: Tensor) -> Tensor:
        if self.regression:
            return torch.zeros((), device=prediction.device)
        return (prediction.argmax(-1) == target).float().mean()

    def query_step(self, step: int) -> int:
        """The network ``step`` the query is predicted with after ``step`` inner steps (per-step layers)."""
        return step

    def predict(self, params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, step: int,
                ctx: EpisodeContext) -> Tensor:
        """Query predictions of (adapted) ``params`` after ``step`` inner steps, BatchNorm as
        ``ctx.bn`` says (training: the batch's statistics)."""
        step = self.query_step(step)
        if ctx.training or ctx.bn == "transductive":
            return self.forward_fn(params, query_x, step)
        if ctx.bn == "running":
            return self.forward_fn(params, query_x, step, Norm(running=True))
        if ctx.bn == "support":
            # the support set first, and its statistics alone; the query rows follow them
            n = support_x.shape[0]
            return self.forward_fn(params, torch.cat([support_x, query_x]), step, Norm(support_rows=n))[n:]

        def one(x: Tensor) -> Tensor:
            # BatchNorm sees the support set plus this one query example.
            return self.forward_fn(params, torch.cat([support_x, x[None]]), step)[-1]

        return vmap(one)(query_x)

    def trace_inner(self, ctx: EpisodeContext) -> bool:
        """Whether ``query_objective`` needs the parameters after every inner step."""
        return False

    def query_objective(self, adapted: Adapted, support_x: Tensor, query_x: Tensor, query_y: Tensor,
                        final_loss: Tensor, ctx: EpisodeContext) -> Tensor:
        """The per-task loss the meta-step minimises. MAML: the query loss after adaptation."""
        return final_loss

    def extra_task_outputs(self, adapted: Adapted, support_x: Tensor, ctx: EpisodeContext) -> dict[str, Any]:
        """More per-task outputs (tensors) to carry out of vmap."""
        return {}

    def inner_penalty(self, params: Params, start: Params, ctx: EpisodeContext) -> Tensor | None:
        """A term added to the inner loop's support loss at ``params`` (the adapted ones), given
        the ``start`` of the inner loop (iMAML: the proximal term); None: none."""
        return None

    def task_gradient(self, adapted: Adapted, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                      query_y: Tensor, ctx: EpisodeContext) -> Params | None:
        """The task's meta-gradient computed in the episode, by name of the adapted parameters
        (iMAML: the implicit gradient), or None: the meta-step back-propagates the query loss."""
        return None

    def absorb_task_outputs(self, out: dict[str, Any]) -> None:
        """Called once per training meta-batch, outside vmap (e.g. running statistics)."""

    # ------------------------------------------------------------------ the meta-batch
    def outer_update(self, batch: TaskBatch, ctx: EpisodeContext | None = None) -> dict[str, Tensor]:
        """Adapt the batch's tasks and step the meta-optimizer. MAML: query losses.

        With ``task_chunk_size`` k below the meta-batch, k tasks at a time
        (:func:`lit_meta.episode.outer_update_in_chunks`), the same update."""
        ctx = self.context(True, batch) if ctx is None else ctx
        chunk = self.task_chunk_size
        if chunk is not None and chunk < batch.num_tasks:
            return outer_update_in_chunks(self, batch, ctx, self.inner_steps, self.first_order_at(ctx), chunk)
        out = run_tasks(self, batch, ctx, self.inner_steps, self.first_order_at(ctx))
        self.meta_step(self, out["updates"], query_losses=out["query_loss"])
        return out

    # ------------------------------------------------------------------ Lightning
    def setup(self, stage: str) -> None:
        # Here, not in __init__: the rule is built from what the subclass's __init__ adds.
        if self.inner_checkpointing and (problem := recompute_problem(self.update_rule(EpisodeContext(True)))):
            raise ValueError(f"inner_checkpointing: {problem}")
        if self.inner_checkpointing and getattr(self.net, "random_forward", False):
            raise ValueError("inner_checkpointing: the network draws random numbers in training (drop_rate > 0), "
                             "so a recomputed step would differ from the one taken; set drop_rate: 0")

    def training_step(self, batch: TaskBatch, batch_idx: int) -> None:
        out = self.outer_update(batch, self.context(True, batch))
        if self.logging_step():
            metric = "mse" if self.regression else "loss"
            if "final_query_loss" in out:
                values = {f"train/{metric}": out["final_query_loss"].mean()}
                if not self.regression:
                    values["train/acc"] = out["query_acc"].mean()
            else:  # no query pass (Reptile): the support loss after the last inner step but one
                values = {f"train/support_{metric}": out["final_support_loss"].mean()}
            self.log_training_values(values)
        self.step_lr_schedule()

    def begin_evaluation(self, split: str) -> None:
        if split == "test":
            self.curves = {}

    def evaluate_batch(self, batch: TaskBatch) -> None:
        """Adapt each task for ``eval_inner_steps`` and add its query loss/accuracy before and
        after (and, on the test tasks, after every inner step)."""
        if not batch.num_tasks:  # a DDP rank with no evaluation task: nothing to add
            return
        ctx = self.context(False, batch)
        by_step = ctx.split == "test"
        with torch.enable_grad():
            out = run_tasks(self, batch, ctx, self.eval_inner_steps, first_order=True, by_step=by_step)
        values = {"loss_after": out["final_query_loss"], "loss_before": out["before_loss"]}
        if not self.regression:
            values.update(acc=out["query_acc"], acc_before=out["before_acc"])
        for key, v in values.items():
            self.eval_sums.add_moments(key, v)
        if by_step:
            curves = {"loss_by_step": out["loss_by_step"]}
            if not self.regression:
                curves["acc_by_step"] = out["acc_by_step"]
            for key, per_step in curves.items():
                # step by step, each a contiguous [tasks] vector as the final metric is, so the
                # last entry's mean is the reported metric to the last bit
                self.eval_sums.add(key, torch.stack([moments(per_step[:, k].contiguous())
                                                     for k in range(per_step.shape[1])]))

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self.evaluate_batch(batch)

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self.evaluate_batch(batch)

    def evaluation_metrics(self, split: str, sums: dict[str, Tensor]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for key, moment_sums in sums.items():
            if key.endswith("_by_step"):
                name = key.replace("loss", "mse" if self.regression else "loss")
                # rounded as the logged metrics are (float32), so the last entry equals test/acc exactly
                self.curves[f"{split}/{name}"] = [float(torch.tensor(mean_ci95(row)[0], dtype=torch.float32))
                                                  for row in moment_sums]
                continue
            mean, ci95, n = mean_ci95(moment_sums)
            name = {"loss_after": "mse_after" if self.regression else "loss",
                    "loss_before": "mse_before" if self.regression else "loss_before"}.get(key, key)
            metrics[f"{split}/{name}"] = mean
            if key in ("acc", "loss_after"):
                metrics[f"{split}/{name}_ci95"] = ci95
            metrics[f"{split}/tasks"] = n
        metrics[f"{split}/adapt_steps"] = float(self.eval_inner_steps)
        return metrics

    def results_extra(self) -> dict[str, Any]:
        """Protocol facts for results.json: BatchNorm at evaluation, test-time steps and
        mini-batch, and the test curves (metric after each inner step 0..steps)."""
        return {"bn": BN_NAMES[self.evaluation_bn()], "test/adapt_steps": self.eval_inner_steps,
                "test/inner_batch_size": self.eval_inner_batch_size, **self.curves}

    @property
    def monitor(self) -> tuple[str, str]:
        return ("val/mse_after", "min") if self.regression else ("val/acc", "max")

    def divergence_cause(self, step: int, batch: Any = None) -> str:
        """Replays ``batch`` (the tasks of the step the divergence was found at) from the current
        (last finite) weights: a loss that is finite at θ but not after the inner steps points at
        the inner rate, else the meta rate."""
        if not isinstance(batch, TaskBatch):
            return super().divergence_cause(step, batch)
        with torch.enable_grad():
            out = run_tasks(self, batch, self.context(False, batch), self.inner_steps, first_order=True)
        if not bool(torch.isfinite(out["before_loss"]).all()):
            return (f"the weights give a non-finite loss before adaptation: the meta learning rate "
                    f"(meta_lr={self.meta_lr}) is too large")
        if not bool(torch.isfinite(out["final_query_loss"]).all()):
            return (f"the loss is finite at the weights but not after {self.inner_steps} inner step(s): the inner "
                    f"learning rate (inner_lr={self.inner_lr}) is too large")
        return (f"the tasks adapt to finite losses, but the meta-gradient or the meta-update is not finite: the meta "
                f"learning rate (meta_lr={self.meta_lr}) is too large, or set grad_clip")

    # ------------------------------------------------------------------ new tasks
    def set_inner_lr(self, inner_lr: float) -> bool:
        """Adapt with ``inner_lr`` from now on; True if that replaced meta-learned rates."""
        if inner_lr <= 0 or not math.isfinite(inner_lr):
            raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
        self.inner_lr = inner_lr
        return False

    def resize_head(self, ways: int) -> int:
        """Replace the head by a zero-initialised one with ``ways`` outputs if it has another
        width (with zero weights every class starts equal and the first inner step moves
        each row towards its class's mean feature). Returns the old width."""
        head = self.net.head
        old = head.out_features
        if old != ways:
            new = nn.Linear(head.in_features, ways, device=head.weight.device, dtype=head.weight.dtype)
            nn.init.zeros_(new.weight)
            nn.init.zeros_(new.bias)
            self.net.head = new
        return old

    def resized_head_note(self, ways: int) -> str:
        """What ``adapt`` tells the user after ``resize_head(ways)`` changed the head's width."""
        return f"adapting a new zero-initialised {ways}-way head"

    def adapt_and_predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                          steps: int | None = None) -> Tensor:
        """One new task through the model's own inner loop and evaluation-mode prediction:
        query outputs ``[n, ...]``, after ``steps`` (default ``eval_inner_steps``) steps."""
        steps = self.eval_inner_steps if steps is None else steps
        ctx = self.context(False)
        params = {n: p.detach() for n, p in self.inner_params().items()}
        schedule = inner_schedule(support_x[None], steps, self.inner_batch_size_of(ctx), ctx)
        with torch.enable_grad():
            adapted = adapt_task(self, params, support_x, support_y, steps, True, ctx,
                                 schedule=None if schedule is None else schedule[0])
            out = self.predict(adapted.params, support_x, support_y, query_x, steps, ctx)
        return out.detach()
