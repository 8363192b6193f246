"""Export of rewritten decode steps: ONNX (:mod:`.onnx`), AOTInductor (:mod:`.aoti`), TensorRT (:mod:`.tensorrt`).

All take a :class:`~entmaxkv_compile.compiler.rewrite.RewriteResult`. ONNX and TensorRT make the
step's state explicit (inputs and outputs, :mod:`.explicit_state`, named by :mod:`.naming`); an
AOTInductor package keeps it inside, updated in place, like the ``.pt2`` program of ``rewrite``.
The submodules are imported on use, so ``onnx`` and ``torch_tensorrt`` stay optional.
"""
