"""Checkpoints of other projects in and out.

    export.py   `moebench export RUN OUT`: a run as a transformers-native checkpoint
                (LlavaForConditionalGeneration; MoE runs with a Qwen2-MoE text model)
    convert.py  `moebench convert PATH OUT`: a checkpoint directory of another layout as a moebench run;
                `moebench eval --model PATH` converts on the fly (cached under runs/.converted/)

The layout of a checkpoint is told from its own config.json (`model_type`, `architectures`) and the
tensor names it holds, never from its folder's name.
"""
