"""DeepSpeed ZeRO training for minbert (installed as ``minbert.distributed``)."""
