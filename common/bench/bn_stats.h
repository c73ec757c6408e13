/*
 * bn_stats: summary statistics for benchmark samples (mean, median, percentiles
 * with linear interpolation between order statistics, as numpy's default).
 */
#ifndef BN_STATS_H
#define BN_STATS_H

#include <stddef.h>

/* The p-th percentile (0..100) of x[0..n); sorts x in place; 0 for n == 0. */
double bn_percentile(double *x, size_t n, double p);
/* The arithmetic mean; 0 for n == 0. */
double bn_mean(const double *x, size_t n);

#endif
