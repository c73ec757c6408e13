/* bn_stats: mean and interpolated percentiles. */
#include "bn_stats.h"

#include <math.h>
#include <stdlib.h>

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y ? 1 : 0;
}

double bn_percentile(double *x, size_t n, double p)
{
    if (n == 0) return 0;
    qsort(x, n, sizeof(double), cmp_d);
    if (p <= 0) return x[0];
    if (p >= 100) return x[n - 1];
    double r = p / 100.0 * (double)(n - 1);
    size_t lo = (size_t)floor(r);
    if (lo + 1 >= n) return x[n - 1];
    double f = r - (double)lo;
    return x[lo] + f * (x[lo + 1] - x[lo]);
}

double bn_mean(const double *x, size_t n)
{
    if (n == 0) return 0;
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += x[i];
    return s / (double)n;
}
