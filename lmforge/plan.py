"""Placeholder: `lmforge plan` is being written (issue 10)."""


def add_plan_arguments(p):
    pass


def plan_command(args):
    raise NotImplementedError
