/*
 * coord_api: the pieces the HTTP front's request kinds share (OpenAI completions in
 * coord_api.c; OpenAI chat completions and Anthropic messages in coord_chat.c): error
 * answers, typed field parsing with 400 answers, the common sampling fields, and the
 * submission of a parsed request to the scheduler.
 */
#ifndef COORD_API_H
#define COORD_API_H

#include "coord.h"

#include <cjson/cJSON.h>

#define API_MAX_PROMPTS  64
#define API_MAX_STOP_IDS 64
#define API_TOKEN_TEXT   (3 * TOK_MAX_TOKEN_BYTES + 32) /* one token's text, cleaned */

/* Answers with a JSON body. */
void coord_api_json(net_http_req_t *req, int status, cJSON *j, const char *extra);
/* Answers with OpenAI's error object ({"error": {message, type, param, code}}). */
void coord_api_error(net_http_req_t *req, int status, const char *type, const char *param,
                     const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* Typed optional fields: absent or null gives def; a wrong type or range answers 400 and
 * returns -1. */
int coord_api_int(const cJSON *o, const char *k, long min, long max, long def, long *out,
                  net_http_req_t *req);
int coord_api_num(const cJSON *o, const char *k, double min, double max, double def, double *out,
                  net_http_req_t *req);
int coord_api_bool(const cJSON *o, const char *k, int def, int *out, net_http_req_t *req);
/* A list of token ids below the vocabulary size, 1..max_prompt long (malloc'd). */
int coord_api_ids(coord_t *c, const cJSON *a, int32_t **out, int *n, net_http_req_t *req);
/* 404 when "model" names another model. */
int coord_api_check_model(coord_t *c, net_http_req_t *req, const cJSON *body);
/* stream_options.include_usage: *out = 2 when streaming with usage. */
int coord_api_stream_options(const cJSON *body, int stream, int *out, net_http_req_t *req);

/* Allocates the request's per-sequence arrays for nseq prompts. */
int coord_api_req_init(coord_t *c, net_http_req_t *req, coord_req_t *r, int nseq);
/* The sampling fields every API shares (max tokens under its own name, temperature,
 * top_p, top_k, seed, stop_token_ids, ignore_eos) into r->sp. */
int coord_api_sampling(coord_t *c, net_http_req_t *req, const cJSON *body, coord_req_t *r,
                       const char *max_tokens_field, int max_tokens_required);
/* Checks the context, queues r and, for a stream, starts it; answers and frees r on any
 * refusal (400 context, 503 not ready, 429 queue full). Set r->api, r->stream and
 * r->logprobs first. */
void coord_api_submit(coord_t *c, net_http_req_t *req, coord_req_t *r);

/* Streaming helpers. */
void coord_api_sse(net_http_req_t *http, cJSON *j);
cJSON *coord_api_usage(const coord_req_t *r);
/* One token's text (invalid UTF-8 as U+FFFD), or "token_id:N" without a tokenizer. */
void coord_api_token_text(const coord_t *c, int32_t id, char *buf, size_t len);

/* Text: stop strings ("stop": a string or a list; 400 when malformed or when no tokenizer
 * is loaded) into r->stops; a text prompt encoded (bos first when add_bos and the model's
 * tokenizer_config.json asks for it), 1..max_prompt tokens, malloc'd. */
int coord_api_stops(coord_t *c, net_http_req_t *req, const cJSON *v, const char *field,
                    coord_req_t *r);
int coord_api_encode(coord_t *c, net_http_req_t *req, const char *field, const char *text,
                     size_t len, int add_bos, int32_t **out, int *n);
/* A sequence's text so far (NULL without a tokenizer), a malloc'd copy of it ("token_id:N"
 * ones without a tokenizer), and its finish_reason ("stop" after a stop string). */
const char *coord_api_seq_text(const coord_seq_t *s, size_t *len);
char *coord_api_text_dup(const coord_seq_t *s);
const char *coord_api_seq_finish(const coord_seq_t *s);

/* coord_chat.c: /v1/chat/completions and /v1/messages */
void coord_chat_handle(coord_t *c, net_http_req_t *req, int anthropic);
/* delta, dlen: the text the token made safe to show (ignored without a tokenizer). */
void coord_chat_token(coord_t *c, coord_req_t *r, coord_seq_t *s, const char *delta, size_t dlen);
/* The prompt of an OpenAI chat body ("messages", "add_generation_prompt") into
 * r->prompts[0]; answers 400 and returns -1 on errors. */
int coord_chat_prompt(coord_t *c, net_http_req_t *req, const cJSON *body, coord_req_t *r);
void coord_chat_finish(coord_t *c, coord_req_t *r, net_http_req_t *http, const char *err);

#endif
