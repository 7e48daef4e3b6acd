"""DeepSpeed ZeRO training for minbert (installed as ``minbert.distributed``).

The same trainer as ``minbert train`` (:func:`minbert.train.train`), one process per rank::

    deepspeed --num_gpus 2 --module minbert.distributed.launch \\
        --config configs/multitask-joint.yaml --deepspeed_config distributed/configs/zero2.json

Modules (none imports DeepSpeed until it is used):

* :mod:`~minbert.distributed.launch` -- the entry point: config checks before anything starts,
  the process group with a timeout, rank-0-only output, exit codes;
* :mod:`~minbert.distributed.config` -- the DeepSpeed JSON: ``"auto"`` values from the recipe,
  ``--ds-set`` patches, batch-size arithmetic and ZeRO stage checks;
* :mod:`~minbert.distributed.engine` -- ``DeepSpeedEngineAdapter``, the trainer's engine interface
  around ``deepspeed.initialize`` (backward/boundary, clipping, step, checkpoints);
* :mod:`~minbert.distributed.sharded` -- PCGrad on ZeRO-partitioned gradients (T·P/N task-gradient
  memory per rank, one T×T all-reduce per step);
* :mod:`~minbert.distributed.checkpoint` -- the consolidated fp32 model of a DeepSpeed checkpoint
  as a minbert / Hugging Face model folder.

``configs/``: ``zero0`` (plain data parallel), ``zero1`` (optimizer states sharded), ``zero2``
(+ gradients), ``zero3`` (+ parameters), ``zero2_offload`` / ``zero3_offload`` (optimizer states
and step on the CPU with DeepSpeed's CPU Adam, compiled on first use). Precision is ``"auto"``:
fp32 on the CPU, bf16 on a GPU that supports it (else fp32; ``--precision fp16`` for fp16).
"""
