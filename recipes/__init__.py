"""Recipes: one short module per recipe, holding only what is the recipe's own.

A recipe is a module `finetune.recipes.NAME` beside a primary config `NAME.yaml`, and defines

    RECIPE = Recipe(
        name="NAME",
        loss=...,           # loss(model, batch, num_items, **extra_models) -> Tensor | LossOutput
        trains="adapter",   # or "all": what the recipe trains; checked against peft.method
        data_formats=(),    # data formats it can train on; () means any
        metrics=(),         # names of extra per-step metrics its loss reports (LossOutput.metrics)
        extra_models=None,  # (cfg, policy) -> {name: module}: models the loss needs besides
                            # the policy (e.g. DPO's frozen reference); passed to it by name
        num_items=trained_tokens,  # what the loss is normalised by, per micro-batch (DPO: pairs)
    )

`Recipe` lives in `finetune.train.recipe`. Everything else is shared and lives in `finetune/`:
`finetune.train.setup` builds the components (accelerator, model with adapter, tokenizer, data,
optimizer, schedule, loggers), `finetune.train.trainer` runs the one loop (token-normalised
accumulation, eval, metrics, checkpoints, preemption), and `finetune.train.run` ties them
together. A recipe never re-implements any of that.

The loss returns its micro-batch's summed loss divided by `num_items`, the trained-token count of
the whole accumulation window across every rank, so gradients do not depend on how the window is
split. Extra metrics are normalised the same way, so their window sum is the window mean.
"""
