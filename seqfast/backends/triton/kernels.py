"""Triton kernel templates of the `triton` backend: one forward and one backward scan, generic over the cell.

Math (one layer, one direction; G gates, S states, H hidden units, cell pointwise code `pw`):
    forward   hg_t = W_hh h_{t-1} + b_hh  (dense; diagonal: w_hh * h_{t-1} + b_hh; none: b_hh or 0)
              state_t = pw.forward(x_t, hg_t, state_{t-1}, params);  out_t = state_t[0]
    backward  d_x_t, d_hg_t, d_state_pw, d_params = pw.backward(x_t, hg_t, state_{t-1}, params, d_state_t)
              d_state_{t-1} = d_state_pw + [d_hg_t @ W_hh on state 0];  d_W_hh = sum_t d_hg_t^T h_{t-1} is one GEMM
              after the loop (on the host), d_b_hh = sum_t d_hg_t.
    staged cells (Pointwise.stages, dense only): the gates split into groups at the stages; group 0's product
    takes h, stage k's vector v_k = pw.stage_k(x_t, hg_t of the gates before it, state_{t-1}, params) is the
    operand of group k+1's product. Backward, stages in reverse: d_v_k = d_hg_t[group k+1] @ W_hh[its rows],
    then stage_k's derivative adds to d_x_t, d_hg_t, d_state, d_params; only group 0's d_hg reaches h directly.
    The forward saves VS_k [T, B, H] = v_k (0 past a row's length): group k+1's rows of d_W_hh take it as operand.
Memory layout (all contiguous, row = t * B + b for the per-row time t of batch row b):
    X [T, B, G*H] (gate g of unit j at g*H + j), OUT / GO [T, B, H], W_hh [G*H, H] or [G*H] (the backward takes
    each gate's block transposed, [G, H, H]: a dot's weight operand should be contiguous along the reduction),
    states [B, H],
    saved: HG [T, B, G*H] (recurrent pre-activations), SV_s [T, B, H] (state s *before* the step at t),
    tiled-path workspaces (fp32): forward WS [2, S, B, H] (ping-pong by step parity; for a staged cell
    followed by its stage vectors [stages, B, H] and one step's hg [G, B, H]), backward WS [S, B, H].
Grid: one program per BLOCK_B batch rows; each program walks all T steps (a persistent kernel). ON_CHIP loads
W_hh once, before the loop (Triton stages a dot's weight operand in shared memory), and keeps the state in
registers; otherwise the hidden dimension is tiled (BLOCK_H output units x BLOCK_K reduction), W_hh streams from
L2 every step and the fp32 state lives in the workspace, with a barrier between steps.
Lengths and reverse: loop step k of row b runs time t = k (forward) or lengths[b] - 1 - k (reverse) while
k < lengths[b]; afterwards the row's state is frozen and its outputs (and gradients) are written as zeros.
The state is fp32 throughout; half-precision inputs feed tl.dot as half with fp32 accumulation, and the
recurrent pre-activations hg are rounded to the input type (they are saved in it) before the gate math.

The templates below are expanded by codegen.py: a line holding `@g` is repeated for every gate, `@s` for every
state, `@p` for every per-unit parameter value, `@f` / `@l` for the gates of the first / last group, `@e` for the
gates before the last group, `@k` for every stage (a line holding several markers is repeated for each
combination). `for @k in STAGES:` (or `reversed(STAGES)`) is unrolled at generation, its body once per stage,
where `@i` are the gates the stage reads, `@c` the group ending at it, `@b` the gates before that group, `@n` the
group after it, `@op` the workspace row of `@c`'s operand and `@xs` / `@hs` the tuples of the stage's inputs.
Without stages there is one group and those loops vanish. `$NAME` tokens are substituted (lists end with a comma
so a single element is still a tuple). `pw_forward` / `pw_backward` / `pw_stage<k>[_backward]` are the cell's own
pointwise functions.
Size: two kernel templates, forward and backward, each one piece of Triton code.
"""

from __future__ import annotations

# The largest distance of _sf_tanh / _sf_sigmoid from torch's float32 results where they are not the same, in
# units in the last place, measured on CPU through the interpreter over ~9M inputs (tests/test_numerics.py checks
# a sweep); at the extremes (+-1, sigmoid's 0) they are torch's exactly.
TANH_F32_MAX_ULPS = 7
SIGMOID_F32_MAX_ULPS = 5

# The math namespace `m` of pointwise code; `m.name(...)` is rewritten to `_sf_name(...)`.
MATH_PRELUDE = '''
@triton.jit
def _sf_exp(x):
    return tl.exp(x)


@triton.jit
def _sf_log(x):
    return tl.log(x)


@triton.jit
def _sf_sqrt(x):
    return tl.sqrt(x)


@triton.jit
def _sf_abs(x):
    return tl.abs(x)


@triton.jit
def _sf_maximum(a, b):
    # NaN propagates as in torch.maximum (hardware max returns the other operand)
    return tl.where((a != a) | (a > b), a, b)


@triton.jit
def _sf_minimum(a, b):
    return tl.where((a != a) | (a < b), a, b)


@triton.jit
def _sf_where(cond, a, b):
    return tl.where(cond, a, b)


@triton.jit
def _sf_relu(x):
    # NaN < 0 is false, so NaN propagates as in torch.relu
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def _sf_sigmoid(x):
    # exp of a non-positive argument only: no overflow, and no 1 - p cancellation for large negative x; 0 where
    # torch's 1 / (1 + exp(-x)) is, as exp(-x) overflows
    e = tl.exp(-tl.abs(x))
    p = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return tl.where(x <= -88.72283935546875, 0.0, p)


@triton.jit
def _sf_tanh(x):
    # tl has no tanh and the interpreter has no libdevice: Eigen's rational approximation, as the numba backend's
    # (seqfast/backends/numba/_math.py, coefficients scaled to start at x / 1, so tiny inputs pass unchanged),
    # exactly +-1 from |x| >= 9.0108404, where torch's float32 tanh is. The clamps let a NaN through.
    c = tl.where(x > 7.90531110763549805, 7.90531110763549805, x)
    c = tl.where(c < -7.90531110763549805, -7.90531110763549805, c)
    c2 = c * c
    p = c2 * -5.6416762410444755e-14 + 4.087417207402143e-11
    p = c2 * p - 1.7583789182401143e-08
    p = c2 * p + 1.0467499187504161e-05
    p = c2 * p + 0.0030360983153184112
    p = c2 * p + 0.1302255336823433
    p = c * (c2 * p + 1.0)
    q = c2 * 0.00024486609330362513 + 0.024222763997786688
    q = c2 * q + 0.46355838509634517
    r = p / (c2 * q + 1.0)
    return tl.where(tl.abs(x) >= 9.01084041595459, tl.where(x > 0, 1.0, -1.0), r)
'''

FORWARD_TEMPLATE = '''
@triton.jit
def scan_forward(
    X, W, BHH, LEN, OUT, HG, WS,
    $P_ARGS
    $S0_ARGS
    $SF_ARGS
    $SV_ARGS
    VS_@k,
    T, B, H,
    HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, RECURRENCE: tl.constexpr, HAS_BIAS: tl.constexpr,
    SAVE: tl.constexpr, ON_CHIP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ROUND_HG: tl.constexpr,
):
    # RECURRENCE: 0 dense, 1 diagonal, 2 none
    # ROUND_HG (half inputs): hg is rounded to the input type as it is saved, so that forward and backward
    # evaluate the cell at the same point (a ReLU's side is decided once)
    pid = tl.program_id(0)
    rb = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = rb < B
    GH = $G * H
    if HAS_LEN:
        L = tl.load(LEN + rb, mask=mb, other=0).to(tl.int32)
    else:
        L = tl.zeros([BLOCK_B], tl.int32) + T
    zero = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    if ON_CHIP:
        rh = tl.arange(0, BLOCK_H)
        mh = rh < H
        m2 = mb[:, None] & mh[None, :]
        # loaded once, kept in registers across all steps; transposed so that h @ wt_g = (W_g h)^T
        if RECURRENCE == 0:
            wt@g = tl.load(W + (@g * H + rh[None, :]) * H + rh[:, None], mask=mh[:, None] & mh[None, :], other=0.0)
            if DOT_F32:
                wt@g = wt@g.to(tl.float32)
        if RECURRENCE == 1:
            wd@g = tl.load(W + @g * H + rh, mask=mh, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bh@g = tl.load(BHH + @g * H + rh, mask=mh, other=0.0).to(tl.float32)
        pv@p = tl.load(@pptr + @prow * H + rh, mask=mh, other=0.0).to(tl.float32)[None, :]
        st@s = tl.load(S0_@s + rb[:, None] * H + rh[None, :], mask=m2, other=0.0).to(tl.float32)
        for step in range(T):
            active = step < L
            if REVERSE:
                t = tl.where(active, L - 1 - step, step)
            else:
                t = tl.zeros([BLOCK_B], tl.int32) + step
            row = t.to(tl.int64) * B + rb
            xoff = row[:, None] * GH + rh[None, :]
            hoff = row[:, None] * H + rh[None, :]
            xg@g = tl.load(X + xoff + @g * H, mask=m2, other=0.0).to(tl.float32)
            if RECURRENCE == 0:
                hd = st0.to(W.dtype.element_ty)
                if DOT_F32:
                    hd = hd.to(tl.float32)
                hg@f = tl.dot(hd, wt@f, input_precision=PRECISION, out_dtype=tl.float32)
            if RECURRENCE == 1:
                hg@g = st0 * wd@g[None, :]
            if RECURRENCE == 2:
                hg@g = zero
            if HAS_BIAS:
                hg@f = hg@f + bh@f[None, :]
            if ROUND_HG:
                hg@f = hg@f.to(X.dtype.element_ty).to(tl.float32)
            for @k in STAGES:  # stage @k's vector takes h's place in the product of the gates after it
                v = pw_stage@k((@xs), (@hs), ($ST), ($PV)) + zero
                if SAVE:  # the operand of those gates' weight gradient (0 past the end: no contribution)
                    tl.store(VS_@k + hoff, tl.where(active[:, None], v, 0.0).to(VS_@k.dtype.element_ty), mask=m2)
                vd = v.to(W.dtype.element_ty)
                if DOT_F32:
                    vd = vd.to(tl.float32)
                hg@n = tl.dot(vd, wt@n, input_precision=PRECISION, out_dtype=tl.float32)
                if HAS_BIAS:
                    hg@n = hg@n + bh@n[None, :]
                if ROUND_HG:
                    hg@n = hg@n.to(X.dtype.element_ty).to(tl.float32)
            if SAVE:
                tl.store(HG + xoff + @g * H, hg@g.to(HG.dtype.element_ty), mask=m2)
                tl.store(SV_@s + hoff, st@s.to(SV_@s.dtype.element_ty), mask=m2)
            new = pw_forward(($XG), ($HGS), ($ST), ($PV))
            keep = active[:, None] & mh[None, :]
            st@s = tl.where(keep, new[@s] + zero, st@s)
            tl.store(OUT + hoff, tl.where(keep, st0, 0.0).to(OUT.dtype.element_ty), mask=m2)
        tl.store(SF_@s + rb[:, None] * H + rh[None, :], st@s.to(SF_@s.dtype.element_ty), mask=m2)
    else:
        BH = B * H
        for step in range(T):
            active = step < L
            if REVERSE:
                t = tl.where(active, L - 1 - step, step)
            else:
                t = tl.zeros([BLOCK_B], tl.int32) + step
            row = t.to(tl.int64) * B + rb
            src = (step % 2) * $S
            dst = $S - src
            for @k in STAGES:  # every unit of stage @k's vector before the next group's product reads it
                for j0 in range(0, H, BLOCK_H):
                    rj = j0 + tl.arange(0, BLOCK_H)
                    mj = rj < H
                    m2 = mb[:, None] & mj[None, :]
                    xoff = row[:, None] * GH + rj[None, :]
                    hoff = row[:, None] * H + rj[None, :]
                    woff = rb[:, None] * H + rj[None, :]
                    acc@c = zero
                    for k0 in range(0, H, BLOCK_K):
                        rk = k0 + tl.arange(0, BLOCK_K)
                        mk = rk < H
                        wmask = mk[:, None] & mj[None, :]
                        vk = tl.load(WS + @op * BH + rb[:, None] * H + rk[None, :], mask=mb[:, None] & mk[None, :],
                                     other=0.0, cache_modifier=".cg").to(W.dtype.element_ty)
                        if DOT_F32:
                            vk = vk.to(tl.float32)
                        w@c = tl.load(W + (@c * H + rj[None, :]) * H + rk[:, None], mask=wmask, other=0.0)
                        if DOT_F32:
                            w@c = w@c.to(tl.float32)
                        acc@c += tl.dot(vk, w@c, input_precision=PRECISION, out_dtype=tl.float32)
                    hg@c = acc@c
                    if HAS_BIAS:
                        hg@c = hg@c + tl.load(BHH + @c * H + rj, mask=mj, other=0.0).to(tl.float32)[None, :]
                    if ROUND_HG:
                        hg@c = hg@c.to(X.dtype.element_ty).to(tl.float32)
                    tl.store(WS + ($HG_ROW + @c) * BH + woff, hg@c, mask=m2)
                    hg@b = tl.load(WS + ($HG_ROW + @b) * BH + woff, mask=m2, other=0.0, cache_modifier=".cg")
                    xg@i = tl.load(X + xoff + @i * H, mask=m2, other=0.0).to(tl.float32)
                    st@s = tl.load(WS + (src + @s) * BH + woff, mask=m2, other=0.0, cache_modifier=".cg")
                    pv@p = tl.load(@pptr + @prow * H + rj, mask=mj, other=0.0).to(tl.float32)[None, :]
                    v = tl.where(active[:, None], pw_stage@k((@xs), (@hs), ($ST), ($PV)) + zero, 0.0)
                    tl.store(WS + ($V_ROW + @k) * BH + woff, v, mask=m2)
                    if SAVE:
                        tl.store(VS_@k + hoff, v.to(VS_@k.dtype.element_ty), mask=m2)
                tl.debug_barrier()
            for j0 in range(0, H, BLOCK_H):
                rj = j0 + tl.arange(0, BLOCK_H)
                mj = rj < H
                m2 = mb[:, None] & mj[None, :]
                xoff = row[:, None] * GH + rj[None, :]
                hoff = row[:, None] * H + rj[None, :]
                woff = rb[:, None] * H + rj[None, :]
                if RECURRENCE == 0:
                    acc@l = zero
                    for k0 in range(0, H, BLOCK_K):
                        rk = k0 + tl.arange(0, BLOCK_K)
                        mk = rk < H
                        wmask = mk[:, None] & mj[None, :]
                        hk = tl.load(WS + $HK_ROW * BH + rb[:, None] * H + rk[None, :], mask=mb[:, None] & mk[None, :],
                                     other=0.0, cache_modifier=".cg").to(W.dtype.element_ty)
                        if DOT_F32:
                            hk = hk.to(tl.float32)
                        w@l = tl.load(W + (@l * H + rj[None, :]) * H + rk[:, None], mask=wmask, other=0.0)
                        if DOT_F32:
                            w@l = w@l.to(tl.float32)
                        acc@l += tl.dot(hk, w@l, input_precision=PRECISION, out_dtype=tl.float32)
                    hg@l = acc@l
                if RECURRENCE == 1:
                    hprev = tl.load(WS + src * BH + woff, mask=m2, other=0.0, cache_modifier=".cg")
                    hg@g = hprev * tl.load(W + @g * H + rj, mask=mj, other=0.0).to(tl.float32)[None, :]
                if RECURRENCE == 2:
                    hg@g = zero
                if HAS_BIAS:
                    hg@l = hg@l + tl.load(BHH + @l * H + rj, mask=mj, other=0.0).to(tl.float32)[None, :]
                if ROUND_HG:
                    hg@l = hg@l.to(X.dtype.element_ty).to(tl.float32)
                hg@e = tl.load(WS + ($HG_ROW + @e) * BH + woff, mask=m2, other=0.0, cache_modifier=".cg")
                pv@p = tl.load(@pptr + @prow * H + rj, mask=mj, other=0.0).to(tl.float32)[None, :]
                st@s = tl.load(WS + (src + @s) * BH + woff, mask=m2, other=0.0, cache_modifier=".cg")
                xg@g = tl.load(X + xoff + @g * H, mask=m2, other=0.0).to(tl.float32)
                if SAVE:
                    tl.store(HG + xoff + @g * H, hg@g.to(HG.dtype.element_ty), mask=m2)
                    tl.store(SV_@s + hoff, st@s.to(SV_@s.dtype.element_ty), mask=m2)
                new = pw_forward(($XG), ($HGS), ($ST), ($PV))
                keep = active[:, None] & mj[None, :]
                tl.store(WS + (dst + @s) * BH + woff, tl.where(keep, new[@s] + zero, st@s), mask=m2)
                tl.store(OUT + hoff, tl.where(keep, new[0] + zero, 0.0).to(OUT.dtype.element_ty), mask=m2)
            # the next step reads every unit of this step's state, written by other threads of this program
            tl.debug_barrier()
'''

BACKWARD_TEMPLATE = '''
@triton.jit
def scan_backward(
    X, W, LEN, HG, GO, DX, DHG, WS,
    $P_ARGS
    $SV_ARGS
    $GF_ARGS
    $DS0_ARGS
    $DP_ARGS
    T, B, H,
    HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, RECURRENCE: tl.constexpr,
    ON_CHIP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rb = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = rb < B
    GH = $G * H
    WT = W.dtype.element_ty
    CG: tl.constexpr = ".cg"  # workspace reads bypass L1: other threads of this program wrote them
    if HAS_LEN:
        L = tl.load(LEN + rb, mask=mb, other=0).to(tl.int32)
    else:
        L = tl.zeros([BLOCK_B], tl.int32) + T
    zero = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    if ON_CHIP:
        rh = tl.arange(0, BLOCK_H)
        mh = rh < H
        m2 = mb[:, None] & mh[None, :]
        # d_h_prev = sum_g d_hg_g @ W_g; W holds each W_g transposed (WT_g[k, j] = W_g[j, k]) so that the dot's
        # weight operand is contiguous along its reduction axis, as in the forward (one shared-memory copy)
        if RECURRENCE == 0:
            w@g = tl.load(W + @g * H * H + rh[None, :] * H + rh[:, None], mask=mh[:, None] & mh[None, :], other=0.0)
            if DOT_F32:
                w@g = w@g.to(tl.float32)
        if RECURRENCE == 1:
            wd@g = tl.load(W + @g * H + rh, mask=mh, other=0.0).to(tl.float32)
        pv@p = tl.load(@pptr + @prow * H + rh, mask=mh, other=0.0).to(tl.float32)[None, :]
        dpacc@p = zero
        c@s = tl.load(GF_@s + rb[:, None] * H + rh[None, :], mask=m2, other=0.0).to(tl.float32)
        for r in range(T):
            step = T - 1 - r
            active = step < L
            if REVERSE:
                t = tl.where(active, L - 1 - step, step)
            else:
                t = tl.zeros([BLOCK_B], tl.int32) + step
            row = t.to(tl.int64) * B + rb
            xoff = row[:, None] * GH + rh[None, :]
            hoff = row[:, None] * H + rh[None, :]
            xg@g = tl.load(X + xoff + @g * H, mask=m2, other=0.0).to(tl.float32)
            hg@g = tl.load(HG + xoff + @g * H, mask=m2, other=0.0).to(tl.float32)
            st@s = tl.load(SV_@s + hoff, mask=m2, other=0.0).to(tl.float32)
            dn@s = c@s
            dn0 = dn0 + tl.load(GO + hoff, mask=m2, other=0.0).to(tl.float32)
            d = pw_backward(($XG), ($HGS), ($ST), ($PV), ($DN))
            keep = active[:, None] & mh[None, :]
            dxg@g = tl.where(keep, d[0][@g] + zero, 0.0)
            dhg@g = tl.where(keep, d[1][@g] + zero, 0.0)
            for @k in reversed(STAGES):  # d_v = d_hg[gates after stage @k] @ W_hh[their rows], then v's derivative
                dv = zero
                dv += tl.dot(dhg@n.to(WT).to(w@n.dtype), w@n, input_precision=PRECISION, out_dtype=tl.float32)
                ds@k = pw_stage@k_backward((@xs), (@hs), ($ST), ($PV), dv)
                dxg@i = dxg@i + tl.where(keep, ds@k[0][@i] + zero, 0.0)
                dhg@i = dhg@i + tl.where(keep, ds@k[1][@i] + zero, 0.0)
                dpacc@p += tl.where(keep, ds@k[3][@p] + zero, 0.0)
            tl.store(DX + xoff + @g * H, dxg@g.to(DX.dtype.element_ty), mask=m2)
            tl.store(DHG + xoff + @g * H, dhg@g.to(DHG.dtype.element_ty), mask=m2)
            dpacc@p += tl.where(keep, d[3][@p] + zero, 0.0)
            rec = zero
            if RECURRENCE == 0:
                rec += tl.dot(dhg@f.to(WT).to(w@f.dtype), w@f, input_precision=PRECISION, out_dtype=tl.float32)
            if RECURRENCE == 1:
                rec += dhg@g * wd@g[None, :]
            nd@s = d[2][@s] + zero
            nd@s = nd@s + ds@k[2][@s]
            nd0 = nd0 + rec
            c@s = tl.where(keep, nd@s, c@s)
        tl.store(DS0_@s + rb[:, None] * H + rh[None, :], c@s.to(DS0_@s.dtype.element_ty), mask=m2)
        tl.store(DP_@p + rb[:, None] * H + rh[None, :], dpacc@p, mask=m2)
    else:
        BH = B * H
        for r in range(T):
            step = T - 1 - r
            active = step < L
            if REVERSE:
                t = tl.where(active, L - 1 - step, step)
            else:
                t = tl.zeros([BLOCK_B], tl.int32) + step
            row = t.to(tl.int64) * B + rb
            # phase 1: pointwise backward of every hidden tile; d_hg goes to DHG, the state gradient to WS
            for j0 in range(0, H, BLOCK_H):
                rj = j0 + tl.arange(0, BLOCK_H)
                mj = rj < H
                m2 = mb[:, None] & mj[None, :]
                xoff = row[:, None] * GH + rj[None, :]
                hoff = row[:, None] * H + rj[None, :]
                woff = rb[:, None] * H + rj[None, :]
                pv@p = tl.load(@pptr + @prow * H + rj, mask=mj, other=0.0).to(tl.float32)[None, :]
                xg@g = tl.load(X + xoff + @g * H, mask=m2, other=0.0).to(tl.float32)
                hg@g = tl.load(HG + xoff + @g * H, mask=m2, other=0.0).to(tl.float32)
                st@s = tl.load(SV_@s + hoff, mask=m2, other=0.0).to(tl.float32)
                c@s = tl.load(WS + @s * BH + woff, mask=m2, other=0.0, cache_modifier=".cg")
                dn@s = c@s
                dn0 = dn0 + tl.load(GO + hoff, mask=m2, other=0.0).to(tl.float32)
                d = pw_backward(($XG), ($HGS), ($ST), ($PV), ($DN))
                keep = active[:, None] & mj[None, :]
                tl.store(DX + xoff + @g * H, tl.where(keep, d[0][@g] + zero, 0.0).to(DX.dtype.element_ty), mask=m2)
                tl.store(DHG + xoff + @g * H, tl.where(keep, d[1][@g] + zero, 0.0).to(DHG.dtype.element_ty), mask=m2)
                dp@p = tl.load(DP_@p + woff, mask=m2, other=0.0)
                tl.store(DP_@p + woff, dp@p + tl.where(keep, d[3][@p] + zero, 0.0), mask=m2)
                tl.store(WS + @s * BH + woff, tl.where(keep, d[2][@s] + zero, c@s), mask=m2)
            tl.debug_barrier()
            for @k in reversed(STAGES):  # d_v = d_hg[gates after stage @k] @ W_hh[their rows], then v's derivative
                for j0 in range(0, H, BLOCK_H):
                    rj = j0 + tl.arange(0, BLOCK_H)
                    mj = rj < H
                    m2 = mb[:, None] & mj[None, :]
                    xoff = row[:, None] * GH + rj[None, :]
                    hoff = row[:, None] * H + rj[None, :]
                    woff = rb[:, None] * H + rj[None, :]
                    doff = row[:, None] * GH
                    dv = zero
                    for k0 in range(0, H, BLOCK_K):
                        rk = k0 + tl.arange(0, BLOCK_K)
                        mk = rk < H
                        dmask = mb[:, None] & mk[None, :]
                        wmask = mk[:, None] & mj[None, :]
                        dk@n = tl.load(DHG + doff + @n * H + rk[None, :], mask=dmask, other=0.0, cache_modifier=CG)
                        dk@n = dk@n.to(WT)
                        w@n = tl.load(W + @n * H * H + rj[None, :] * H + rk[:, None], mask=wmask, other=0.0)
                        if DOT_F32:
                            dk@n = dk@n.to(tl.float32)
                            w@n = w@n.to(tl.float32)
                        dv += tl.dot(dk@n, w@n, input_precision=PRECISION, out_dtype=tl.float32)
                    pv@p = tl.load(@pptr + @prow * H + rj, mask=mj, other=0.0).to(tl.float32)[None, :]
                    xg@i = tl.load(X + xoff + @i * H, mask=m2, other=0.0).to(tl.float32)
                    hg@i = tl.load(HG + xoff + @i * H, mask=m2, other=0.0).to(tl.float32)
                    st@s = tl.load(SV_@s + hoff, mask=m2, other=0.0).to(tl.float32)
                    ds = pw_stage@k_backward((@xs), (@hs), ($ST), ($PV), dv)
                    keep = active[:, None] & mj[None, :]
                    dxg@i = tl.load(DX + xoff + @i * H, mask=m2, other=0.0, cache_modifier=CG).to(tl.float32)
                    dxg@i += tl.where(keep, ds[0][@i] + zero, 0.0)
                    tl.store(DX + xoff + @i * H, dxg@i.to(DX.dtype.element_ty), mask=m2)
                    dhg@i = tl.load(DHG + xoff + @i * H, mask=m2, other=0.0, cache_modifier=CG).to(tl.float32)
                    dhg@i += tl.where(keep, ds[1][@i] + zero, 0.0)
                    tl.store(DHG + xoff + @i * H, dhg@i.to(DHG.dtype.element_ty), mask=m2)
                    dp@p = tl.load(DP_@p + woff, mask=m2, other=0.0)
                    tl.store(DP_@p + woff, dp@p + tl.where(keep, ds[3][@p] + zero, 0.0), mask=m2)
                    c@s = tl.load(WS + @s * BH + woff, mask=m2, other=0.0, cache_modifier=".cg")
                    tl.store(WS + @s * BH + woff, c@s + tl.where(keep, ds[2][@s] + zero, 0.0), mask=m2)
                tl.debug_barrier()
            # phase 2: d_h_prev += d_hg @ W_hh, which needs every tile of this step's d_hg
            if RECURRENCE != 2:
                for j0 in range(0, H, BLOCK_H):
                    rj = j0 + tl.arange(0, BLOCK_H)
                    mj = rj < H
                    m2 = mb[:, None] & mj[None, :]
                    woff = rb[:, None] * H + rj[None, :]
                    doff = row[:, None] * GH
                    rec = zero
                    if RECURRENCE == 0:
                        for k0 in range(0, H, BLOCK_K):
                            rk = k0 + tl.arange(0, BLOCK_K)
                            mk = rk < H
                            dmask = mb[:, None] & mk[None, :]
                            wmask = mk[:, None] & mj[None, :]
                            dk@f = tl.load(DHG + doff + @f * H + rk[None, :], mask=dmask, other=0.0, cache_modifier=CG)
                            dk@f = dk@f.to(WT)
                            w@f = tl.load(W + @f * H * H + rj[None, :] * H + rk[:, None], mask=wmask, other=0.0)
                            if DOT_F32:
                                dk@f = dk@f.to(tl.float32)
                                w@f = w@f.to(tl.float32)
                            rec += tl.dot(dk@f, w@f, input_precision=PRECISION, out_dtype=tl.float32)
                    if RECURRENCE == 1:
                        dk@g = tl.load(DHG + doff + @g * H + rj[None, :], mask=m2, other=0.0, cache_modifier=CG)
                        wd@g = tl.load(W + @g * H + rj, mask=mj, other=0.0).to(tl.float32)
                        rec += dk@g.to(tl.float32) * wd@g[None, :]
                    c0 = tl.load(WS + woff, mask=m2, other=0.0, cache_modifier=".cg")
                    tl.store(WS + woff, tl.where(active[:, None], c0 + rec, c0), mask=m2)
                tl.debug_barrier()
'''

# The rest of the math namespace, and the operators whose Python (and torch) semantics Triton lacks: % is C's
# fmod there and // and ** are missing (codegen rewrites `a % b` to _sf_mod(a, b), and so on). tl has no log1p,
# expm1 or pow, and the interpreter has no libdevice, so they are built from exp and log with the classic
# corrections for rounding.
MATH_EXTENSIONS = '''
@triton.jit
def _sf_sin(x):
    return tl.sin(x)


@triton.jit
def _sf_cos(x):
    return tl.cos(x)


@triton.jit
def _sf_log1p(x):
    # log(w) * x / (w - 1) with w = 1 + x as rounded (Goldberg): accurate for small x, where log(1 + x) is not
    w = 1.0 + x
    ratio = tl.where(x == w, 1.0, x / (w - 1.0))  # x == w: x is inf (or so large that 1 + x rounds to x)
    return tl.where(w == 1.0, x, tl.log(w) * ratio)


@triton.jit
def _sf_expm1(x):
    # (u - 1) * x / log(u) with u = exp(x) as rounded (Kahan): accurate for small x, where exp(x) - 1 is not
    u = tl.exp(x)
    um1 = u - 1.0
    r = tl.where((um1 == u) | (u == 0.0), um1, um1 * (x / tl.log(u)))  # u - 1 exact: large x, or x -> -inf
    return tl.where(u == 1.0, x, r)


@triton.jit
def _sf_softplus(x):
    # torch.nn.functional.softplus with its defaults (beta=1, threshold=20): linear above the threshold
    return tl.where(x > 20.0, x, _sf_log1p(tl.exp(x)))


@triton.jit
def _sf_clamp(x, low, high):
    # as torch.clamp: NaN propagates, and low > high gives high
    return _sf_minimum(_sf_maximum(x, low), high)


@triton.jit
def _sf_pow(a, b):
    # torch.pow: |a|^b by exp and log, negative for a negative base and an odd integer exponent, NaN (log of a
    # negative number) for a negative base and a non-integer one; x^0 = 1^y = 1 even for NaN; squares exact
    b = tl.where(a == a, b, b)  # a number b as a tensor (of a's shape), for floor and &
    a = a + tl.zeros_like(b)  # a number a as a tensor of b's type, so that its log is taken at that precision
    integral = tl.floor(b) == b
    odd = integral & (tl.floor(b * 0.5) * 2.0 != b)
    base = tl.where((a < 0.0) & integral, -a, a)
    mag = tl.exp(b * tl.log(base))
    r = tl.where((a < 0.0) & odd, -mag, mag)
    r = tl.where(b == 2.0, a * a, r)
    return tl.where((b == 0.0) | (a == 1.0), 1.0, r)


@triton.jit
def _sf_mod(a, b):
    # Python's and torch's remainder takes the divisor's sign; fmod's (Triton's %) takes the dividend's
    r = a % b
    return tl.where((r != 0.0) & ((r < 0.0) != (b < 0.0)), r + b, r)


@triton.jit
def _sf_floordiv(a, b):
    # torch's (and CPython's) floor division: from fmod, so that it is exact where floor(a / b) is not
    r = a % b
    q = (a - r) / b
    q = tl.where((r != 0.0) & ((r < 0.0) != (b < 0.0)), q - 1.0, q)
    f = tl.floor(q)
    f = tl.where(q - f > 0.5, f + 1.0, f)
    return tl.where(b == 0.0, a / b, tl.where(q == 0.0, 0.0 * (a / b), f))
'''
