"""How a run spreads over its processes: the memory estimate and strategy choice
(`memory`, `choose`) and the engines that carry a strategy out (`engine`)."""
