/*
 * mdl_config: the Step3 text model's configuration, parsed from a checkpoint's
 * config.json (the step3_vl wrapper with text_config, or a plain text config).
 */
#ifndef MDL_CONFIG_H
#define MDL_CONFIG_H

#include "afd_status.h"

#include <stdint.h>

#define MDL_MAX_LAYERS  1024
#define MDL_MAX_EXPERTS 1024
#define MDL_MAX_DIM     (1 << 17)
#define MDL_MAX_VOCAB   (1 << 21)
#define MDL_MAX_EOS     8

typedef enum mdl_quant { MDL_QUANT_NONE = 0, MDL_QUANT_FP8_BLOCK = 1 } mdl_quant_t;

typedef struct mdl_config {
    int hidden_size;  /* H */
    int num_layers;   /* num_hidden_layers */
    int num_heads;    /* num_attention_heads (query heads) */
    int num_kv_heads; /* num_attention_groups; MFA: 1 */
    int head_dim;
    int share_q_dim; /* low-rank query dimension */
    double rope_theta;
    int vocab_size;
    int max_position; /* max_position_embedding */
    int num_experts;  /* moe_num_experts */
    int top_k;        /* moe_top_k */
    int moe_inter;    /* moe_intermediate_size */
    int share_expert_dim;
    int dense_inter; /* intermediate_size */
    int norm_expert_weight;
    float rms_eps;
    uint8_t is_moe[MDL_MAX_LAYERS]; /* from moe_layers_enum */
    mdl_quant_t quant;
    int quant_block[2]; /* weight_block_size, [128, 128] */
    int bos_token_id;   /* -1 when absent */
    int eos_token_ids[MDL_MAX_EOS];
    int num_eos;
} mdl_config_t;

/*
 * Parses JSON text into cfg; `what` names the source in errors. Unknown keys are
 * ignored; a missing, mistyped, out-of-range or inconsistent value is an error
 * naming the field.
 */
afd_status_t mdl_config_parse(const char *json, const char *what, mdl_config_t *cfg);
/* Reads DIR/config.json and parses it. */
afd_status_t mdl_config_load(const char *dir, mdl_config_t *cfg);
/* Checks the derived invariants (also run by parse). */
afd_status_t mdl_config_validate(const mdl_config_t *cfg, const char *what);
/* Number of MoE layers. */
int mdl_config_num_moe(const mdl_config_t *cfg);

#endif
