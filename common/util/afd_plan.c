/* afd_plan: pipeline sizing rules. */
#include "afd_plan.h"

#include <math.h>

int afd_plan_micro_batches(double t_comm, double t_ffn, int lo, int hi)
{
    if (!(t_ffn > 0) || !(t_comm >= 0)) return lo;
    double m = ceil(2.0 * (1.0 + t_comm / t_ffn) - 1e-9);
    if (m < lo) return lo;
    if (m > hi) return hi;
    return (int)m;
}
