/*
 * bn_svg: line plots as hand-written SVG (generic font families only, nothing fetched),
 * for the benchmark sweeps: one polyline with markers per series, axes with ticks, a
 * legend.
 */
#ifndef BN_SVG_H
#define BN_SVG_H

#include "afd_status.h"

#include <stddef.h>

typedef struct bn_series {
    const char *name;
    const double *x, *y; /* (n) */
    size_t n;
} bn_series_t;

/* Writes the plot to path; AFD_ERR_IO (logged) when the file cannot be written. */
afd_status_t bn_svg_plot(const char *path, const char *title, const char *xlabel,
                         const char *ylabel, const bn_series_t *s, size_t ns);

#endif
