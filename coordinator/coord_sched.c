/*
 * coord_sched: the global continuous-batching scheduler. Requests wait in one
 * FCFS queue; a sequence is admitted to the attention node with the most free KV
 * blocks when its prompt + max_tokens fit there (blocks are reserved up front,
 * so a running sequence never runs out). Step plans go to every attention node
 * and are sent up to plan-ahead steps before their results come back, so the
 * coordinator is not on the critical path between steps: the nodes decode from
 * their own sampled tokens and only admissions and aborts travel in plans.
 */
#define _GNU_SOURCE
#include "coord.h"
#include "afd_log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static coord_node_t *attn_node(coord_t *c, int slot)
{
    return slot >= 0 ? &c->nodes[slot] : NULL;
}

static void seq_finish(coord_t *c, coord_seq_t *s, const char *finish, const char *error)
{
    if (s->done) return;
    s->done = 1;
    s->finish = finish;
    if (error && !s->error) s->error = strdup(error);
    free(s->recover_error);
    s->recover_error = NULL;
    s->recover_until_us = 0;
    coord_node_t *n = attn_node(c, s->node);
    if (n) {
        if (n->kv_reserved >= (uint64_t)s->nblocks) n->kv_reserved -= (uint64_t)s->nblocks;
        n->running--;
        c->nrunning--;
        if (n->drained && n->running == 0 && n->member) {
            afd_info("attention node %u is drained: it leaves the data plane", n->id);
            c->reconfig = 1;
        }
    }
    s->node = -1;
    coord_req_t *r = s->req;
    r->ndone++;
    if (error) r->failed = 1;
    if (r->ndone == r->nseq) coord_api_finish(c, r);
}

static void wait_remove(coord_t *c, coord_seq_t *s)
{
    coord_seq_t **p = &c->wait_head, *prev = NULL;
    for (; *p; prev = *p, p = &(*p)->next_wait)
        if (*p == s) {
            *p = s->next_wait;
            if (c->wait_tail == s) c->wait_tail = prev;
            c->nwaiting--;
            return;
        }
}

/* A preempted sequence goes back to the head of the queue with its prompt and the tokens
 * it has so far as its new prompt: it is recomputed, and its stream goes on. */
static void seq_requeue(coord_t *c, coord_seq_t *s)
{
    coord_req_t *r = s->req;
    coord_node_t *n = attn_node(c, s->node);
    if (n) {
        if (n->kv_reserved >= (uint64_t)s->nblocks) n->kv_reserved -= (uint64_t)s->nblocks;
        n->running--;
        c->nrunning--;
    }
    s->node = -1;
    int plen = r->prompt_len[s->choice];
    int32_t *res = realloc(s->resume, sizeof(int32_t) * (size_t)(plen + s->ngen));
    if (!res) {
        seq_finish(c, s, "error", "out of memory re-admitting a preempted sequence");
        return;
    }
    memcpy(res, r->prompts[s->choice], sizeof(int32_t) * (size_t)plen);
    memcpy(res + plen, s->out, sizeof(int32_t) * (size_t)s->ngen);
    s->resume = res;
    s->resume_len = plen + s->ngen;
    s->resume_sp = r->sp;
    s->resume_sp.max_tokens = r->sp.max_tokens - (uint32_t)s->ngen;
    c->metrics.preemptions++;
    s->next_wait = c->wait_head;
    c->wait_head = s;
    if (!c->wait_tail) c->wait_tail = s;
    c->nwaiting++;
}

afd_status_t coord_sched_submit(coord_t *c, coord_req_t *r, const char **why)
{
    if (c->nwaiting + r->nseq > c->o.max_waiting) {
        *why = "the waiting queue is full";
        return AFD_ERR_BUSY;
    }
    for (int i = 0; i < r->nseq; i++) {
        coord_seq_t *s = &r->seqs[i];
        s->id = ++c->next_seq_id;
        s->node = -1;
        s->next_wait = NULL;
        if (c->wait_tail)
            c->wait_tail->next_wait = s;
        else
            c->wait_head = s;
        c->wait_tail = s;
        c->nwaiting++;
    }
    r->next = c->reqs;
    c->reqs = r;
    coord_sched_kick(c);
    return AFD_OK;
}

static int blocks_needed(const coord_node_t *n, int tokens)
{
    return (tokens + (int)n->kv_block_size - 1) / (int)n->kv_block_size;
}

/* Whether any running sequence may still need another step beyond those in flight. */
static int work_left(coord_t *c)
{
    if (c->nwaiting > 0) return 1;
    for (coord_req_t *r = c->reqs; r; r = r->next)
        for (int i = 0; i < r->nseq; i++) {
            coord_seq_t *s = &r->seqs[i];
            if (s->done || s->node < 0) continue;
            coord_node_t *n = &c->nodes[s->node];
            int prefill_steps = 0;
            if (s->ngen == 0 && n->max_batch_tokens)
                prefill_steps =
                    (r->prompt_len[i] + (int)n->max_batch_tokens - 1) / (int)n->max_batch_tokens;
            if ((int)r->sp.max_tokens - s->ngen + prefill_steps > c->ninflight) return 1;
        }
    for (int i = 0; i < COORD_MAX_NODES; i++)
        if (c->naborts[i]) return 1;
    return 0;
}

static void send_plan(coord_t *c)
{
    uint64_t t0 = coord_now_us();
    uint64_t step = c->next_step++;
    /* admissions: FCFS, each to the attention node with the most free blocks */
    Afd__SeqAdmit **adm[COORD_MAX_NODES] = {0};
    size_t nadm[COORD_MAX_NODES] = {0};
    while (c->wait_head) {
        coord_seq_t *s = c->wait_head;
        coord_req_t *r = s->req;
        int tokens = r->prompt_len[s->choice] + (int)r->sp.max_tokens;
        if (s->resume) tokens = s->resume_len + (int)s->resume_sp.max_tokens;
        int best = -1;
        uint64_t best_free = 0;
        for (int i = 0; i < COORD_MAX_NODES; i++) {
            coord_node_t *n = &c->nodes[i];
            if (!n->open || n->state != NODE_CONNECTED || n->role != AFD__ROLE__ROLE_ATTN ||
                !n->member || n->drained)
                continue;
            /* with overcommit, admission counts on sequences ending before max_tokens; one
             * sequence must still fit the node alone */
            uint64_t budget = (uint64_t)((double)n->kv_blocks * c->o.kv_overcommit);
            uint64_t fr = budget > n->kv_reserved ? budget - n->kv_reserved : 0;
            if ((uint64_t)blocks_needed(n, tokens) <= fr &&
                (uint64_t)blocks_needed(n, tokens) <= n->kv_blocks &&
                n->running < c->o.max_running && (!n->max_seqs || n->running < (int)n->max_seqs) &&
                (best < 0 || fr > best_free)) {
                best = i;
                best_free = fr;
            }
        }
        if (best < 0) break; /* the head does not fit anywhere now: keep FCFS order */
        coord_node_t *n = &c->nodes[best];
        wait_remove(c, s);
        uint64_t now = coord_now_us();
        coord_hist_observe(&c->metrics.queue, (double)(now - r->t_arrival_us) / 1e6);
        c->metrics.prompt_tokens += (uint64_t)r->prompt_len[s->choice];
        s->node = best;
        s->recover_until_us = 0; /* back in the data plane after a node loss */
        s->nblocks = blocks_needed(n, tokens);
        n->kv_reserved += (uint64_t)s->nblocks;
        n->running++;
        c->nrunning++;
        Afd__SeqAdmit *a = malloc(sizeof(*a));
        AFD_ASSERT(a);
        afd__seq_admit__init(a);
        a->seq_id = s->id;
        a->n_prompt = (size_t)r->prompt_len[s->choice];
        a->prompt = r->prompts[s->choice];
        a->sampling = &r->sp;
        if (s->resume) {
            a->n_prompt = (size_t)s->resume_len;
            a->prompt = s->resume;
            a->sampling = &s->resume_sp;
        }
        Afd__SeqAdmit **na = realloc(adm[best], sizeof(*na) * (nadm[best] + 1));
        AFD_ASSERT(na);
        adm[best] = na;
        adm[best][nadm[best]++] = a;
    }
    int sent = 0;
    for (int i = 0; i < COORD_MAX_NODES; i++) {
        coord_node_t *n = &c->nodes[i];
        if (!n->open || n->state != NODE_CONNECTED || n->role != AFD__ROLE__ROLE_ATTN || !n->member)
            continue;
        Afd__StepPlan p = AFD__STEP_PLAN__INIT;
        p.step = step;
        p.micro_batches = (uint32_t)c->micro_batches;
        p.epoch = c->epoch;
        p.n_admit = nadm[i];
        p.admit = adm[i];
        p.n_abort = (size_t)c->naborts[i];
        p.abort = c->aborts[i];
        Afd__Frame f = AFD__FRAME__INIT;
        f.body_case = AFD__FRAME__BODY_PLAN;
        f.plan = &p;
        coord_nodes_send(n, &f);
        for (size_t k = 0; k < nadm[i]; k++)
            free(adm[i][k]);
        free(adm[i]);
        free(c->aborts[i]);
        c->aborts[i] = NULL;
        c->naborts[i] = 0;
        sent++;
    }
    int slot = c->ninflight++;
    c->inflight[slot] = step;
    c->inflight_results[slot] = sent;
    c->inflight_sent_us[slot] = coord_now_us();
    c->sched_us_sum += coord_now_us() - t0;
}

void coord_sched_kick(coord_t *c)
{
    if (c->reconfig) {
        /* a new epoch waits until no plan is in flight: running sequences only pause */
        if (c->ninflight == 0) coord_nodes_publish(c);
        return;
    }
    while (c->ready && c->ninflight < c->o.plan_ahead && c->ninflight < COORD_MAX_PLAN_AHEAD &&
           work_left(c))
        send_plan(c);
}

static coord_seq_t *seq_by_id(coord_t *c, uint64_t id)
{
    for (coord_req_t *r = c->reqs; r; r = r->next)
        if (id >= r->seqs[0].id && id < r->seqs[0].id + (uint64_t)r->nseq)
            return &r->seqs[id - r->seqs[0].id];
    return NULL;
}

void coord_sched_on_result(coord_t *c, coord_node_t *n, const Afd__StepResult *res)
{
    int slot = -1;
    for (int i = 0; i < c->ninflight; i++)
        if (c->inflight[i] == res->step) slot = i;
    if (slot < 0) {
        afd_warn("node %u: result for step %llu, which is not in flight", n->id,
                 (unsigned long long)res->step);
        return;
    }
    for (size_t i = 0; i < res->n_tokens; i++) {
        const Afd__SeqToken *t = res->tokens[i];
        coord_seq_t *s = seq_by_id(c, t->seq_id);
        if (!s || s->done) continue; /* aborted meanwhile */
        if (s->node != (int)(n - c->nodes)) {
            afd_warn("node %u reported sequence %llu it does not run", n->id,
                     (unsigned long long)t->seq_id);
            continue;
        }
        coord_req_t *r = s->req;
        if (t->finish == AFD__FINISH__FINISH_PREEMPTED) {
            seq_requeue(c, s);
            continue;
        }
        if (t->finish == AFD__FINISH__FINISH_ERROR) {
            seq_finish(c, s, "error", t->error && t->error[0] ? t->error : "attention node error");
            continue;
        }
        if (t->token < 0 || t->token >= c->cfg.vocab_size || s->ngen >= (int)r->sp.max_tokens) {
            seq_finish(c, s, "error", "attention node sent an invalid token");
            continue;
        }
        s->out[s->ngen] = t->token;
        s->lp[s->ngen] = t->logprob;
        int L = r->logprobs > 0 ? r->logprobs : 0;
        for (int k = 0; k < L; k++) {
            int ok = (size_t)k < t->n_top_ids && (size_t)k < t->n_top_logprobs;
            s->top_ids[s->ngen * L + k] = ok ? t->top_ids[k] : -1;
            s->top_lp[s->ngen * L + k] = ok ? t->top_logprobs[k] : 0;
        }
        s->ngen++;
        c->metrics.generation_tokens++;
        uint64_t now = coord_now_us();
        if (!r->t_first_us) {
            r->t_first_us = now;
            coord_hist_observe(&c->metrics.ttft, (double)(now - r->t_arrival_us) / 1e6);
        }
        if (s->t_last_us) coord_hist_observe(&c->metrics.itl, (double)(now - s->t_last_us) / 1e6);
        s->t_last_us = now;
        const char *fin = t->finish == AFD__FINISH__FINISH_STOP     ? "stop"
                          : t->finish == AFD__FINISH__FINISH_LENGTH ? "length"
                                                                    : NULL;
        if (fin) s->finish = fin;
        coord_api_token(c, r, s);
        if (fin) seq_finish(c, s, fin, NULL);
    }
    if (res->error && res->error[0]) {
        /* the node dropped everything it ran */
        for (coord_req_t *r = c->reqs; r; r = r->next)
            for (int i = 0; i < r->nseq; i++)
                if (!r->seqs[i].done && r->seqs[i].node == (int)(n - c->nodes))
                    seq_finish(c, &r->seqs[i], "error", res->error);
    }
    if (--c->inflight_results[slot] == 0) {
        uint64_t dt = coord_now_us() - c->inflight_sent_us[slot];
        c->step_us_sum += dt;
        c->last_step_ms = dt / 1000.0;
        c->steps_done++;
        for (int i = slot; i + 1 < c->ninflight; i++) {
            c->inflight[i] = c->inflight[i + 1];
            c->inflight_results[i] = c->inflight_results[i + 1];
            c->inflight_sent_us[i] = c->inflight_sent_us[i + 1];
        }
        c->ninflight--;
    }
    coord_sched_reap(c);
    coord_sched_kick(c);
}

/* Ends one sequence with `finish` (and `error`, or NULL): its attention node drops it with
 * the next plan, or it leaves the queue. The caller reaps and kicks. */
static void seq_drop(coord_t *c, coord_seq_t *s, const char *finish, const char *error)
{
    if (s->done) return;
    if (s->node >= 0) {
        int nd = s->node;
        uint64_t *na = realloc(c->aborts[nd], sizeof(uint64_t) * (size_t)(c->naborts[nd] + 1));
        if (na) {
            c->aborts[nd] = na;
            c->aborts[nd][c->naborts[nd]++] = s->id;
        }
    } else {
        wait_remove(c, s);
    }
    seq_finish(c, s, finish, error);
}

void coord_sched_abort_seq(coord_t *c, coord_seq_t *s, const char *finish)
{
    seq_drop(c, s, finish, NULL);
    coord_sched_reap(c);
    coord_sched_kick(c);
}

void coord_sched_abort_req(coord_t *c, coord_req_t *r)
{
    r->aborted = 1;
    for (int i = 0; i < r->nseq; i++)
        seq_drop(c, &r->seqs[i], "abort", NULL);
    coord_sched_reap(c);
    coord_sched_kick(c);
}

void coord_sched_node_lost(coord_t *c, coord_node_t *n, const char *why)
{
    if (!n->member) return; /* joining, or drained out of the data plane: nothing used it */
    n->member = 0;
    char msg[256];
    snprintf(msg, sizeof(msg), "%s node %u lost (%s)",
             n->role == AFD__ROLE__ROLE_ATTN ? "attention" : "FFN", n->id, why);
    int was_ready = c->ready;
    c->ready = 0;
    /* every running sequence needs the whole cluster for its next step: it goes back to
     * the queue, to be recomputed from its prompt and the tokens it has once the cluster is
     * whole again (its stream goes on), or ends with the error after the recovery timeout,
     * or at once when it was sent back too often */
    uint64_t until = coord_now_us() + (uint64_t)c->o.recovery_timeout_s * 1000000u;
    int requeued = 0, failed = 0;
    for (coord_req_t *r = c->reqs; r; r = r->next) {
        for (int i = 0; i < r->nseq; i++) {
            coord_seq_t *s = &r->seqs[i];
            if (s->done || s->node < 0) continue;
            if (c->o.recovery_timeout_s > 0 && !r->aborted &&
                s->recoveries < COORD_MAX_RECOVERIES) {
                seq_requeue(c, s);
                if (s->done) continue; /* out of memory: ended */
                s->recoveries++;
                if (!s->recover_until_us) s->recover_until_us = until;
                if (!s->recover_error) s->recover_error = strdup(msg);
                requeued++;
            } else {
                seq_finish(c, s, "error", msg);
                failed++;
            }
        }
    }
    if (requeued || failed)
        afd_warn("%s: %d running sequences wait to be recomputed, %d ended", msg, requeued, failed);
    c->ninflight = 0;
    for (int i = 0; i < COORD_MAX_NODES; i++) {
        free(c->aborts[i]);
        c->aborts[i] = NULL;
        c->naborts[i] = 0;
        c->nodes[i].kv_reserved = 0;
        c->nodes[i].running = 0;
    }
    c->nrunning = 0;
    coord_sched_reap(c);
    if (was_ready) afd_warn("cluster not ready: %s", msg);
    /* the others go on under a new epoch as soon as the shares are complete again (an
     * attention node lost: at once, with the remaining ones) */
    if (c->formed) {
        c->reconfig = 1;
        coord_sched_kick(c);
    }
}

void coord_sched_abort_all(coord_t *c, const char *why)
{
    for (coord_req_t *r = c->reqs; r; r = r->next)
        for (int i = 0; i < r->nseq; i++)
            seq_drop(c, &r->seqs[i], "error", why);
    coord_sched_reap(c);
    coord_sched_kick(c);
}

/* Sequences sent back to the queue by a node loss end with that loss's error when the
 * cluster did not become whole again in time. */
static void expire_recoveries(coord_t *c, uint64_t now)
{
    int any = 0;
    for (coord_req_t *r = c->reqs; r; r = r->next)
        for (int i = 0; i < r->nseq; i++) {
            coord_seq_t *s = &r->seqs[i];
            if (s->done || s->node >= 0 || !s->recover_until_us || now < s->recover_until_us)
                continue;
            char why[320];
            snprintf(why, sizeof(why), "%s; the cluster was not whole again within %ld s",
                     s->recover_error ? s->recover_error : "a node was lost",
                     c->o.recovery_timeout_s);
            wait_remove(c, s);
            seq_finish(c, s, "error", why);
            any = 1;
        }
    if (any) {
        coord_sched_reap(c);
        coord_sched_kick(c);
    }
}

void coord_sched_expire(coord_t *c)
{
    uint64_t now = coord_now_us();
    if (c->nwaiting) expire_recoveries(c, now);
    if (c->o.request_timeout_s <= 0) return;
    uint64_t lim = (uint64_t)c->o.request_timeout_s * 1000000u;
    char why[96];
    snprintf(why, sizeof(why), "request timed out after %ld s", c->o.request_timeout_s);
    int any = 0;
    for (coord_req_t *r = c->reqs; r; r = r->next)
        if (!r->finished && now - r->t_arrival_us > lim)
            for (int i = 0; i < r->nseq; i++)
                if (!r->seqs[i].done) {
                    seq_drop(c, &r->seqs[i], "error", why);
                    any = 1;
                }
    if (any) {
        coord_sched_reap(c);
        coord_sched_kick(c);
    }
}

void coord_sched_reap(coord_t *c)
{
    for (coord_req_t **p = &c->reqs; *p;) {
        coord_req_t *r = *p;
        if (r->finished) {
            *p = r->next;
            coord_req_free(r);
        } else {
            p = &r->next;
        }
    }
}
