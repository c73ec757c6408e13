/* afd_log: stderr logging with a level and a program-name prefix. */
#include "afd_log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *g_prog = "afd";
static int g_level = -1;

void afd_log_init(const char *progname)
{
    const char *slash = progname ? strrchr(progname, '/') : NULL;
    g_prog = slash ? slash + 1 : (progname ? progname : "afd");
}

int afd_log_level_parse(const char *s)
{
    static const char *names[] = {"error", "warn", "info", "debug"};
    for (int i = 0; i < 4; i++)
        if (s && strcmp(s, names[i]) == 0) return i;
    return -1;
}

void afd_log_set_level(afd_log_level_t level)
{
    g_level = (int)level;
}

int afd_log_enabled(afd_log_level_t level)
{
    if (g_level < 0) {
        int l = afd_log_level_parse(getenv("AFD_LOG_LEVEL"));
        g_level = l < 0 ? AFD_LOG_INFO : l;
    }
    return (int)level <= g_level;
}

void afd_log(afd_log_level_t level, const char *fmt, ...)
{
    static const char *tags[] = {"error", "warning", "info", "debug"};
    if (!afd_log_enabled(level)) return;
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    /* one write per line so lines from several processes do not interleave */
    fprintf(stderr, "%s: %s: %s\n", g_prog, tags[level], buf);
}
