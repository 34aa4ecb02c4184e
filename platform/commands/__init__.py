"""``platform/commands/`` is imported as ``dinoforge.commands``: the subcommand groups of the
``dinoforge`` CLI with many flags, one module each. ``add_parsers(sub)`` adds a group to the
parser ``dinoforge.cli`` builds; its handlers call the functions that do the work.

data.py       dinoforge data import | pack | info
evaluate.py   dinoforge evaluate <protocol> | suite
curate.py     dinoforge curate embed | dedup | cluster | sample | retrieve | report | make-pool | run
"""
