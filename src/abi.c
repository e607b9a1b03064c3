// nm_struct_size: the library's own sizeof of each public struct, so a binding that restates
// them (the ctypes mirrors in python/) can check, at load, the library it opened against itself.
#include <string.h>

#include "nanomegatron.h"

#define NM_STRUCT(T) {#T, sizeof(T)}

static const struct {
    const char *name;
    size_t size;
} nm_structs[] = {
    NM_STRUCT(nm_error),         NM_STRUCT(nm_model_config), NM_STRUCT(nm_tensor_spec),   NM_STRUCT(nm_param_table),
    NM_STRUCT(nm_trainer_options), NM_STRUCT(nm_step_metrics), NM_STRUCT(nm_loss_options), NM_STRUCT(nm_loss_terms),
    NM_STRUCT(nm_model_options), NM_STRUCT(nm_adamw_config), NM_STRUCT(nm_optimizer),     NM_STRUCT(nm_grad_report),
    NM_STRUCT(nm_data_spec),     NM_STRUCT(nm_data_cursor),  NM_STRUCT(nm_train_config),  NM_STRUCT(nm_prepare_opts),
    NM_STRUCT(nm_prepare_stats),
};

size_t nm_struct_size(const char *name) {
    if (!name) return 0;
    for (size_t i = 0; i < sizeof(nm_structs) / sizeof(nm_structs[0]); i++)
        if (strcmp(nm_structs[i].name, name) == 0) return nm_structs[i].size;
    return 0;
}
