/*
 * afd_log: one-line, lowercase log messages on stderr, prefixed by the program
 * name and the level. The level comes from AFD_LOG_LEVEL (error, warn, info,
 * debug; default info) or afd_log_set_level(). An error is logged once, where it
 * is first seen.
 */
#ifndef AFD_LOG_H
#define AFD_LOG_H

typedef enum afd_log_level {
    AFD_LOG_ERROR = 0,
    AFD_LOG_WARN = 1,
    AFD_LOG_INFO = 2,
    AFD_LOG_DEBUG = 3
} afd_log_level_t;

/* Sets the program name printed before every message (default "afd"). */
void afd_log_init(const char *progname);
void afd_log_set_level(afd_log_level_t level);
/* Parses "error|warn|info|debug"; returns -1 when unknown. */
int afd_log_level_parse(const char *s);
int afd_log_enabled(afd_log_level_t level);

void afd_log(afd_log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define afd_error(...) afd_log(AFD_LOG_ERROR, __VA_ARGS__)
#define afd_warn(...)  afd_log(AFD_LOG_WARN, __VA_ARGS__)
#define afd_info(...)  afd_log(AFD_LOG_INFO, __VA_ARGS__)
#define afd_debug(...)                                                                             \
    do {                                                                                           \
        if (afd_log_enabled(AFD_LOG_DEBUG)) afd_log(AFD_LOG_DEBUG, __VA_ARGS__);                   \
    } while (0)

#endif
