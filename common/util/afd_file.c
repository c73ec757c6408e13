/* afd_file: a whole file into memory. */
#define _GNU_SOURCE
#include "afd_file.h"

#include "afd_log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

afd_status_t afd_read_file(const char *path, size_t max, char **text, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        int e = errno;
        afd_error("%s: %s", path, strerror(e));
        return e == ENOENT ? AFD_ERR_NOT_FOUND : AFD_ERR_IO;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    afd_status_t st = AFD_OK;
    while (buf) {
        if (n + 1 >= cap) {
            if (cap >= max) {
                afd_error("%s: larger than %zu MB", path, max >> 20);
                st = AFD_ERR_RANGE;
                break;
            }
            char *p = realloc(buf, cap * 2);
            if (!p) {
                st = AFD_ERR_NOMEM;
                break;
            }
            buf = p, cap *= 2;
        }
        size_t k = fread(buf + n, 1, cap - 1 - n, f);
        n += k;
        if (k == 0) {
            if (ferror(f)) {
                afd_error("%s: %m", path);
                st = AFD_ERR_IO;
            }
            break;
        }
    }
    fclose(f);
    if (!buf) return AFD_ERR_NOMEM;
    if (st) {
        free(buf);
        return st;
    }
    buf[n] = 0;
    *text = buf;
    *len = n;
    return AFD_OK;
}
