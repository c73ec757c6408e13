/*
 * afd_file: reading a whole file into memory, bounded.
 */
#ifndef AFD_FILE_H
#define AFD_FILE_H

#include "afd_status.h"

#include <stddef.h>

/* Reads the file at path into *text (malloc'd, NUL-terminated, *len bytes). Errors are
 * logged with the path: NOT_FOUND, IO, RANGE (larger than max bytes), NOMEM. */
afd_status_t afd_read_file(const char *path, size_t max, char **text, size_t *len);

#endif
