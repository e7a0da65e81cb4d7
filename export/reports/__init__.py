"""What long jobs and evaluations show people: progress lines, the evaluation chart and summary.

Owns presentation only, no computation of figures. Imports numpy, matplotlib (lazily, when a
chart is drawn) and `agent.stacks.labels`; nothing else from `export`, so every other
sub-package may use it.
"""
