"""A trained NESTOR's routing under expert parallelism: recorded on its own training stream, replayed for
expert-parallel groups, and its token experts placed so that every rank of a group carries an equal load.

    python -m nestor_ds.routing.profile --checkpoint runs/x/model.safetensors --ranks 6 --ep 2 3 6
    python -m nestor_ds.routing.place --checkpoint runs/x/checkpoints --ep 2 --order-out runs/x/expert_order.json

The data flow: a checkpoint or export -> ``record.py`` (routing counts per step, rank, block and expert) ->
``replay.py`` (what those counts cost at ep_size P) -> ``profile.py`` (the report) or ``place.py`` (a re-ordered export,
or an expert-order file that ``train.expert_order`` applies on resume). The balanced orders themselves and the
re-ordering of state dicts are ``nestor_ds.moe.placement`` (pure functions the checkpoint code uses too).
"""
