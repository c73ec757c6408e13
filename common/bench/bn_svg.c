/* bn_svg: SVG line plots. */
#define _GNU_SOURCE
#include "bn_svg.h"

#include "afd_log.h"

#include <math.h>
#include <stdio.h>

/* a "nice" tick step for a span: 1, 2 or 5 times a power of ten, about 5 ticks */
static double nice_step(double span)
{
    if (!(span > 0)) return 1;
    double raw = span / 5, p = pow(10, floor(log10(raw))), f = raw / p;
    return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * p;
}

/* text with the XML specials escaped */
static void put_text(FILE *f, const char *s)
{
    for (; s && *s; s++) {
        if (*s == '<')
            fputs("&lt;", f);
        else if (*s == '>')
            fputs("&gt;", f);
        else if (*s == '&')
            fputs("&amp;", f);
        else if (*s == '"')
            fputs("&quot;", f);
        else
            fputc(*s, f);
    }
}

afd_status_t bn_svg_plot(const char *path, const char *title, const char *xlabel,
                         const char *ylabel, const bn_series_t *s, size_t ns)
{
    static const char *colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd",
                                   "#ff7f0e", "#17becf", "#8c564b", "#e377c2"};
    const double W = 720, H = 460, L = 80, R = 190, T = 40, B = 60;
    double x0 = INFINITY, x1 = -INFINITY, y0 = 0, y1 = -INFINITY;
    for (size_t i = 0; i < ns; i++)
        for (size_t k = 0; k < s[i].n; k++) {
            if (!isfinite(s[i].x[k]) || !isfinite(s[i].y[k])) continue;
            if (s[i].x[k] < x0) x0 = s[i].x[k];
            if (s[i].x[k] > x1) x1 = s[i].x[k];
            if (s[i].y[k] > y1) y1 = s[i].y[k];
        }
    if (!isfinite(x0)) x0 = 0, x1 = 1, y1 = 1;
    x0 = x0 > 0 ? 0 : x0;
    if (x1 <= x0) x1 = x0 + 1;
    if (y1 <= y0) y1 = y0 + 1;
    double xs = nice_step(x1 - x0), ys = nice_step(y1 - y0);
    x1 = ceil(x1 / xs) * xs;
    y1 = ceil(y1 / ys) * ys;
    FILE *f = fopen(path, "w");
    if (!f) {
        afd_error("plot %s: %m", path);
        return AFD_ERR_IO;
    }
    double pw = W - L - R, ph = H - T - B;
#define PX(v) (L + ((v)-x0) / (x1 - x0) * pw)
#define PY(v) (T + ph - ((v)-y0) / (y1 - y0) * ph)
    fprintf(f,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
            "viewBox=\"0 0 %.0f %.0f\" font-family=\"sans-serif\" font-size=\"12\">\n",
            W, H, W, H);
    fprintf(f, "<rect x=\"0\" y=\"0\" width=\"%.0f\" height=\"%.0f\" fill=\"white\"/>\n", W, H);
    fprintf(f, "<text x=\"%.1f\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">", L + pw / 2);
    put_text(f, title);
    fprintf(f, "</text>\n");
    for (double v = x0; v <= x1 + xs * 1e-6; v += xs) {
        fprintf(f,
                "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n"
                "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%g</text>\n",
                PX(v), T, PX(v), T + ph, PX(v), T + ph + 16, v);
    }
    for (double v = y0; v <= y1 + ys * 1e-6; v += ys) {
        fprintf(f,
                "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n"
                "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n",
                L, PY(v), L + pw, PY(v), L - 6, PY(v) + 4, v);
    }
    fprintf(f,
            "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" "
            "stroke=\"black\"/>\n",
            L, T, pw, ph);
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">", L + pw / 2, H - 18);
    put_text(f, xlabel);
    fprintf(f,
            "</text>\n<text x=\"18\" y=\"%.1f\" text-anchor=\"middle\" "
            "transform=\"rotate(-90 18 %.1f)\">",
            T + ph / 2, T + ph / 2);
    put_text(f, ylabel);
    fprintf(f, "</text>\n");
    for (size_t i = 0; i < ns; i++) {
        const char *col = colors[i % (sizeof(colors) / sizeof(colors[0]))];
        fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"", col);
        for (size_t k = 0; k < s[i].n; k++)
            if (isfinite(s[i].x[k]) && isfinite(s[i].y[k]))
                fprintf(f, "%s%.1f,%.1f", k ? " " : "", PX(s[i].x[k]), PY(s[i].y[k]));
        fprintf(f, "\"/>\n");
        for (size_t k = 0; k < s[i].n; k++)
            if (isfinite(s[i].x[k]) && isfinite(s[i].y[k]))
                fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"%s\"/>\n",
                        PX(s[i].x[k]), PY(s[i].y[k]), col);
        double ly = T + 14 + 20 * (double)i;
        fprintf(f,
                "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" "
                "stroke-width=\"2\"/>\n<text x=\"%.1f\" y=\"%.1f\">",
                L + pw + 14, ly, L + pw + 38, ly, col, L + pw + 44, ly + 4);
        put_text(f, s[i].name);
        fprintf(f, "</text>\n");
    }
    fprintf(f, "</svg>\n");
#undef PX
#undef PY
    if (fclose(f)) {
        afd_error("plot %s: %m", path);
        return AFD_ERR_IO;
    }
    return AFD_OK;
}
