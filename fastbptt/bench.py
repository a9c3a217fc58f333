"""``fastbptt bench``: loss_and_grad against its peers, in one process run."""


def add_parser(sub):
    p = sub.add_parser("bench", help="benchmark loss_and_grad against numpy, torch and jax")
    p.set_defaults(run=lambda args: 0)
