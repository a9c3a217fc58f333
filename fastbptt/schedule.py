"""Which hidden states a memory-bounded backward keeps, and what it recomputes (``stored_states``).

A schedule is a list of actions on the states x_0..x_T of a sweep (x_t: h_t, and c_t for the
LSTM, of every layer), carried out by ``fastbptt._model.bounded``:

    ("advance", a, b, store)   from the current x_a, compute x_b (forward only); keep it if store
    ("restore", a)             make the kept x_a current
    ("free", a)                drop the kept x_a
    ("reverse", a, b)          from the current x_a, recompute steps a+1..b with their gates
                               and run their backward (the adjoint of x_b in, of x_a out)

- :func:`segments` ("sqrt"): x_0, x_m, x_2m, ... kept in one forward pass, m = ⌈T/⌊√T⌋⌉ ≈ √T; each
  segment reversed from its first state.  Every step but the last segment's is computed twice.
- :func:`revolve` (an int n): Griewank and Walther's binomial schedule (ACM TOMS 26(1), 2000),
  with n slots for kept states (x_0's among them).  Its forward steps (advances) number
  exactly :func:`forward_steps` (T, n) = r·T − β(n+1, r−1), the fewest any schedule with n
  slots can do, where β(s, r) = C(s+r, s) and r is the least integer with β(n, r) ≥ T.
"""
from math import comb, isqrt

__all__ = ["beta", "repetitions", "forward_steps", "revolve", "segments", "advances", "schedule", "window"]


def beta(s, r):
    """β(s, r) = C(s+r, s): the most steps s slots reverse with each step computed at most r
    times in the forward passes (0 for r < 0)"""
    return comb(s + r, s) if r >= 0 else 0


def repetitions(l, s):
    """r(l, s): the least r with β(s, r) >= l"""
    r = 0
    while beta(s, r) < l:
        r += 1
    return r


def forward_steps(l, s):
    """the fewest forward steps (advances, not counting each reversed step's own recomputation)
    that reverse l steps with s slots: r·l − β(s+1, r−1), r = r(l, s)"""
    if l <= 1:
        return 0
    r = repetitions(l, s)
    return r * l - beta(s + 1, r - 1)


def _split(l, s):
    """where an optimal schedule keeps its next state in a range of l steps with s slots (s >= 2,
    l > s): any m in [max(β(s,r−2), l−β(s−1,r)), min(β(s,r−1), l−β(s−1,r−1))] is optimal"""
    r = repetitions(l, s)
    return max(1, beta(s, r - 2), l - beta(s - 1, r))


def revolve(T, n):
    """the actions of the binomial schedule reversing T steps with n slots (n >= 1, x_0's among
    them): a list, see the module notes"""
    out = []
    stack = [("rev", 0, T, n)]
    while stack:
        item = stack.pop()
        if item[0] != "rev":
            out.append(item)
            continue
        _, a, l, s = item
        if l == 0:
            continue
        if s == 1 or l == 1:                       # one slot: from x_a to every step in turn
            for i in range(l, 0, -1):
                out.append(("restore", a))
                if i > 1:
                    out.append(("advance", a, a + i - 1, False))
                out.append(("reverse", a + i - 1, a + i))
        elif s >= l:                               # every state of the range fits: keep them all
            out.append(("restore", a))
            out.extend(("advance", a + i - 1, a + i, True) for i in range(1, l))
            for i in range(l, 0, -1):
                out.append(("restore", a + i - 1))
                out.append(("reverse", a + i - 1, a + i))
                if i > 1:
                    out.append(("free", a + i - 1))
        else:                                      # keep x_{a+m}; the right part with s-1 slots
            m = _split(l, s)
            stack += [("rev", a, m, s), ("free", a + m), ("rev", a + m, l - m, s - 1),
                      ("advance", a, a + m, True), ("restore", a)]
    return out


def segments(T, m=None):
    """the actions of the "sqrt" schedule: x_0, x_m, ... kept in one forward pass (m = ⌈T/⌊√T⌋⌉),
    then each segment reversed from its first state, the last first"""
    m = m or max(1, -(-T // max(1, isqrt(T))))
    starts = list(range(0, T, m))
    out = [("advance", a, a + m, True) for a in starts[:-1]]
    for a in reversed(starts):
        out += [("restore", a), ("reverse", a, min(a + m, T))]
        if a:
            out.append(("free", a))
    return out


def advances(actions):
    """the forward steps of a schedule's advances"""
    return sum(x[2] - x[1] for x in actions if x[0] == "advance")


def schedule(T, stored_states):
    """the actions for ``stored_states`` ("sqrt" or an int n) over T steps"""
    return segments(T) if stored_states == "sqrt" else revolve(T, stored_states)


def window(T, stored_states):
    """Truncated(k)'s window of loss terms: m = ⌈T/⌊√T⌋⌉ for "sqrt", else ⌈T/n⌉ (n windows); also
    the longest advance of a schedule (with "sqrt")"""
    if stored_states == "sqrt":
        return max(1, -(-T // max(1, isqrt(T))))
    return max(1, -(-T // stored_states))
