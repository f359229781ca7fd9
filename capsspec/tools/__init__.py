"""The tools around the specification and its training: the command line (cli), the benchmark
(bench), the GPU check (gpucheck and the step runner it drives), figures, and ONNX export.

Tools build on the training room (capsspec.training) and the specification below it; nothing
below imports a tool.
"""
