"""Flextron's width routing: a budget (relative compute or target latency) -> the width of every layer.

`routers` (the static and input-adaptive `WidthRouter`, trained through the surrogate, then a joint fine-tune),
`surrogate` (the small MLP that predicts a configuration's ΔLM loss), `costs` (additive latency / FLOPs of a hard
or soft configuration), `soft` (probability-weighted nested widths for the joint fine-tune), `configurations` (menu
indices <-> a FlextronModel, the adaptive router's input feature, the two cost models), `budget` (`set_budget` on a
model, per prompt for the adaptive router) and `build` (`build_router`: the whole recipe in the paper's order).
"""
