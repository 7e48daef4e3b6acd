"""``python midsave_worker.py LAUNCH_ARGS...``: ``minbert.distributed.launch`` in which rank 1 dies
half-way through writing its ZeRO optimizer partition at its second checkpoint (a torn file on disk,
then ``os._exit``), as a rank killed mid-save would. Used by test_failures.py."""
import os
import sys

from deepspeed.runtime.engine import DeepSpeedEngine

_saves = {"n": 0}
_original = DeepSpeedEngine._save_zero_checkpoint


def _dies_on_second_save(self, save_path, tag):
    _saves["n"] += 1
    if int(os.environ.get("RANK", "0")) == 1 and _saves["n"] == 2:
        torn = self._get_zero_ckpt_name(save_path, tag)
        os.makedirs(os.path.dirname(torn), exist_ok=True)
        with open(torn, "wb") as f:
            f.write(b"PK\x03\x04 torn")  # the start of a zip, then nothing
        os._exit(9)
    return _original(self, save_path, tag)


DeepSpeedEngine._save_zero_checkpoint = _dies_on_second_save

if __name__ == "__main__":
    from minbert.distributed.launch import _exit, main

    _exit(main(sys.argv[1:]))
