"""Cooperative kernel templates of the `triton` backend: hidden units split across programs, a grid barrier per step.

The math is kernels.py's (same cell pointwise code, same saved tensors, same lengths/reverse and rounding rules);
only the work split differs. Grid: GROUPS x SLICES programs, at most one per SM so that all are resident at once.
Program p serves batch group p // SLICES (BLOCK_B rows) and owns hidden units (p % SLICES) * BLOCK_J + [0, BLOCK_J)
of every gate and state for the whole sequence.
    forward   it keeps its rows of W_hh ([G, BLOCK_J, H], transposed) on chip from the first step to the last; per
              step it reads h_{t-1} of every unit of its batch rows (BLOCK_B x H, from L2), forms its slice of the
              gates and the pointwise math, and writes its slice of the states to the workspace
              WS [2, S, B, H] (fp32, ping-pong by step parity). The group then meets at its barrier: the next step
              reads the units the other slices wrote, and the slot it writes was read by everyone one step earlier.
    backward  it keeps the columns of W_hh for its units ([G, H, BLOCK_J]); phase 1 runs the pointwise backward of
              its slice (d_hg to DHG, the state gradients to WS [S, B, H]); after the barrier, phase 2 adds
              d_h_prev[:, slice] = sum_g d_hg_g[:, every unit] @ W_g[:, slice], reading the other slices' d_hg of
              this step from DHG (fresh rows each step: nothing to overwrite). d_W_hh stays one GEMM after the loop.
Barrier (_sf_grid_barrier): the cooperative-groups sign-bit flip on one int32 word per batch group (the groups do
not interact): the group's first program adds 2^31 - (SLICES - 1), the others 1, so each round flips bit 31 once
and the word never needs a reset; a program waits, with acquire loads, until bit 31 differs from the value its
own release add returned. The CTA barrier before the arrive orders every warp's stores before it.
Sequential mode (GRID_BARRIER False / PHASE 1 or 2): Triton's interpreter runs programs one after another, so no
program may wait for another. The host then launches one step (forward) or one phase of one step (backward) at a
time over [STEP0, STEP0 + STEPS): the launch boundary is the barrier, and the slicing, exchange buffers and math
are the same code as in the GPU mode. Cells without a dense recurrence exchange nothing and never wait.
Staged cells (Pointwise.stages) need one exchange per stage and are not generated here (codegen skips them).
Markers and tokens are kernels.py's (expanded by codegen.py).
"""

from __future__ import annotations

# The grid barrier: every program of a batch group calls it with the group's word and the group's size.
COOP_PRELUDE = '''
@triton.jit
def _sf_grid_barrier(BAR, n: tl.constexpr):
    tl.debug_barrier()  # every warp's stores of this step come before the release (Triton < 3.9 does not order them)
    lead = tl.full([], 0x80000000 - (n - 1), tl.uint32).to(tl.int32, bitcast=True)
    arrive = tl.where(tl.program_id(0) % n == 0, lead, 1)
    old = tl.atomic_add(BAR, arrive, sem="release", scope="gpu")
    flipped = False
    while not flipped:
        flipped = (old ^ tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")) < 0  # bit 31 differs
    tl.debug_barrier()
'''

# Both kernels' program: its batch rows (rb) and hidden units (rj), the reduction range (rk), the lengths (L)
_SLICE = '''\
    pid = tl.program_id(0)
    group = pid // SLICES
    rb = group * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = rb < B
    rj = (pid % SLICES) * BLOCK_J + tl.arange(0, BLOCK_J)
    mj = rj < H
    rk = tl.arange(0, BLOCK_K)
    mk = rk < H
    m2 = mb[:, None] & mj[None, :]
    GH = $G * H
    BH = B * H
    woff = rb[:, None] * H + rj[None, :]
    if HAS_LEN:
        L = tl.load(LEN + rb, mask=mb, other=0).to(tl.int32)
    else:
        L = tl.zeros([BLOCK_B], tl.int32) + T
    zero = tl.zeros([BLOCK_B, BLOCK_J], tl.float32)
'''

# Both kernels' rows of loop step `step`: time t of each batch row, and the offsets of its slice at t
_STEP_ROWS = '''\
        if REVERSE:
            t = tl.where(active, L - 1 - step, step)
        else:
            t = tl.zeros([BLOCK_B], tl.int32) + step
        row = t.to(tl.int64) * B + rb
        xoff = row[:, None] * GH + rj[None, :]
        hoff = row[:, None] * H + rj[None, :]
'''

COOP_FORWARD_TEMPLATE = '''
@triton.jit
def coop_forward(
    X, W, BHH, LEN, OUT, HG, WS, BAR,
    $P_ARGS
    $SV_ARGS
    T, B, H, STEP0, STEPS,
    HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, RECURRENCE: tl.constexpr, HAS_BIAS: tl.constexpr,
    SAVE: tl.constexpr, GRID_BARRIER: tl.constexpr, SLICES: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    ROUND_HG: tl.constexpr,
):
''' + _SLICE + '''\
    # this program's rows of every W_g, transposed (h @ wt_g = (W_g[slice] h)^T): loaded once, on chip throughout
    if RECURRENCE == 0:
        wt@g = tl.load(W + (@g * H + rj[None, :]) * H + rk[:, None], mask=mk[:, None] & mj[None, :], other=0.0)
        if DOT_F32:
            wt@g = wt@g.to(tl.float32)
    if RECURRENCE == 1:
        wd@g = tl.load(W + @g * H + rj, mask=mj, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bh@g = tl.load(BHH + @g * H + rj, mask=mj, other=0.0).to(tl.float32)
    pv@p = tl.load(@pptr + @prow * H + rj, mask=mj, other=0.0).to(tl.float32)[None, :]
    for step in range(STEP0, STEP0 + STEPS):
        active = step < L
''' + _STEP_ROWS + '''\
        src = (step % 2) * $S
        dst = $S - src
        st@s = tl.load(WS + (src + @s) * BH + woff, mask=m2, other=0.0, cache_modifier=".cg")
        xg@g = tl.load(X + xoff + @g * H, mask=m2, other=0.0).to(tl.float32)
        if RECURRENCE == 0:
            # h_{t-1} of every unit of these batch rows: the other slices wrote theirs before the last barrier
            hk = tl.load(WS + src * BH + rb[:, None] * H + rk[None, :], mask=mb[:, None] & mk[None, :], other=0.0,
                         cache_modifier=".cg").to(W.dtype.element_ty)
            if DOT_F32:
                hk = hk.to(tl.float32)
            hg@g = tl.dot(hk, wt@g, input_precision=PRECISION, out_dtype=tl.float32)
        if RECURRENCE == 1:
            hg@g = st0 * wd@g[None, :]
        if RECURRENCE == 2:
            hg@g = zero
        if HAS_BIAS:
            hg@g = hg@g + bh@g[None, :]
        if ROUND_HG:
            hg@g = hg@g.to(X.dtype.element_ty).to(tl.float32)
        if SAVE:
            tl.store(HG + xoff + @g * H, hg@g.to(HG.dtype.element_ty), mask=m2)
            tl.store(SV_@s + hoff, st@s.to(SV_@s.dtype.element_ty), mask=m2)
        new = pw_forward(($XG), ($HGS), ($ST), ($PV))
        keep = active[:, None] & mj[None, :]
        tl.store(WS + (dst + @s) * BH + woff, tl.where(keep, new[@s] + zero, st@s), mask=m2)
        tl.store(OUT + hoff, tl.where(keep, new[0] + zero, 0.0).to(OUT.dtype.element_ty), mask=m2)
        if GRID_BARRIER and RECURRENCE == 0:
            _sf_grid_barrier(BAR + group, SLICES)
        else:
            tl.debug_barrier()  # this program's next step reads its own slice, stored by other threads
'''

COOP_BACKWARD_TEMPLATE = '''
@triton.jit
def coop_backward(
    X, W, LEN, HG, GO, DX, DHG, WS, BAR,
    $P_ARGS
    $SV_ARGS
    $DP_ARGS
    T, B, H, STEP0, STEPS,
    HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, RECURRENCE: tl.constexpr, PHASE: tl.constexpr,
    SLICES: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    # PHASE 0: both phases of every step, the grid barrier between them; 1 / 2: only that phase (sequential mode)
''' + _SLICE + '''\
    WT = W.dtype.element_ty
    # this program's columns of every W_g (W holds each W_g transposed, so a column is contiguous along the
    # reduction): wc_g[k, j] = W_g[k, slice j], loaded once
    if RECURRENCE == 0:
        wc@g = tl.load(W + @g * H * H + rj[None, :] * H + rk[:, None], mask=mk[:, None] & mj[None, :], other=0.0)
        if DOT_F32:
            wc@g = wc@g.to(tl.float32)
    if RECURRENCE == 1:
        wd@g = tl.load(W + @g * H + rj, mask=mj, other=0.0).to(tl.float32)
    pv@p = tl.load(@pptr + @prow * H + rj, mask=mj, other=0.0).to(tl.float32)[None, :]
    for r in range(STEP0, STEP0 + STEPS):
        step = T - 1 - r
        active = step < L
''' + _STEP_ROWS + '''\
        if PHASE != 2:  # the pointwise backward of this program's units
            c@s = tl.load(WS + @s * BH + woff, mask=m2, other=0.0, cache_modifier=".cg")
            xg@g = tl.load(X + xoff + @g * H, mask=m2, other=0.0).to(tl.float32)
            hg@g = tl.load(HG + xoff + @g * H, mask=m2, other=0.0).to(tl.float32)
            st@s = tl.load(SV_@s + hoff, mask=m2, other=0.0).to(tl.float32)
            dn@s = c@s
            dn0 = dn0 + tl.load(GO + hoff, mask=m2, other=0.0).to(tl.float32)
            d = pw_backward(($XG), ($HGS), ($ST), ($PV), ($DN))
            keep = active[:, None] & mj[None, :]
            tl.store(DX + xoff + @g * H, tl.where(keep, d[0][@g] + zero, 0.0).to(DX.dtype.element_ty), mask=m2)
            tl.store(DHG + xoff + @g * H, tl.where(keep, d[1][@g] + zero, 0.0).to(DHG.dtype.element_ty), mask=m2)
            dp@p = tl.load(DP_@p + woff, mask=m2, other=0.0)
            tl.store(DP_@p + woff, dp@p + tl.where(keep, d[3][@p] + zero, 0.0), mask=m2)
            tl.store(WS + @s * BH + woff, tl.where(keep, d[2][@s] + zero, c@s), mask=m2)
        if PHASE == 0 and RECURRENCE == 0:
            _sf_grid_barrier(BAR + group, SLICES)  # every slice's d_hg of this step is in DHG
        else:
            tl.debug_barrier()
        if PHASE != 1 and RECURRENCE != 2:  # d_h_prev of this program's units += d_hg @ W_hh[:, slice]
            rec = zero
            if RECURRENCE == 0:
                dmask = mb[:, None] & mk[None, :]
                doff = row[:, None] * GH + rk[None, :]
                dk@g = tl.load(DHG + doff + @g * H, mask=dmask, other=0.0, cache_modifier=".cg").to(WT)
                if DOT_F32:
                    dk@g = dk@g.to(tl.float32)
                rec += tl.dot(dk@g, wc@g, input_precision=PRECISION, out_dtype=tl.float32)
            if RECURRENCE == 1:
                dk@g = tl.load(DHG + xoff + @g * H, mask=m2, other=0.0, cache_modifier=".cg")
                rec += dk@g.to(tl.float32) * wd@g[None, :]
            c0 = tl.load(WS + woff, mask=m2, other=0.0, cache_modifier=".cg")
            tl.store(WS + woff, tl.where(active[:, None], c0 + rec, c0), mask=m2)
            tl.debug_barrier()  # the next step's phase 1 reads this program's slice, stored by other threads
'''
