"""seqio task and mixture registrations, one module per benchmark family.

Importing a module registers its tasks (idempotently): `tasks.glue`,
`tasks.super_glue`, `tasks.glue_transfer`, `tasks.qa`, `tasks.toy`; use it as
T5X's `MIXTURE_OR_TASK_MODULE`. This package imports none of them itself.
The GLUE/SuperGLUE/transfer/QA modules take their vocabulary from
`prompt_tuning.data.features.get_vocabulary()` (see there, e.g. the
`PROMPT_TUNING_VOCAB` environment variable for an offline `.model` file).
"""
