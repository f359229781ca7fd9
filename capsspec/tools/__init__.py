"""The tools around the specification and its training: the command line (cli), the benchmark
(bench), the GPU check (gpucheck, with the step runner it drives, the parsers of the steps' outputs
and the report it leaves: step_runner, step_parsers, check_report), figures, and ONNX export.

Tools build on the training room (capsspec.training) and the specification below it; nothing
below imports a tool.
"""
