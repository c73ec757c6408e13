/*
 * afd_plan: the pipeline sizing rules the coordinator (and the planner) use.
 */
#ifndef AFD_PLAN_H
#define AFD_PLAN_H

/*
 * The MegaScale-Infer ping-pong rule: with m micro-batches the FFN stays busy when
 * m * T_f >= 2 (T_f + T_c), so m = ceil(2 (1 + T_c / T_f)), clamped to [lo, hi].
 * t_comm and t_ffn are one micro-batch's transfer and FFN times (any one unit); a
 * non-positive t_ffn gives lo.
 */
int afd_plan_micro_batches(double t_comm, double t_ffn, int lo, int hi);

#endif
