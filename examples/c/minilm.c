/* Embeds one sentence with MiniLM through kiln's C API.
 *
 *   kiln compile examples/minilm/minilm.kiln -w model.safetensors --emit lib -o build/libminilm.a
 *   cc examples/c/minilm.c -I build build/libminilm.a -Wl,--gc-sections -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc -o build/minilm
 *   build/minilm 101 7592 2088 102        # token ids of "[CLS] hello world [SEP]"
 *
 * It prints each output's name and shape, then its values, one per line, with 9
 * significant digits (enough to give back every float exactly).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "minilm.h"

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s TOKEN_ID...\n", argv[0]);
        return 2;
    }
    size_t n = (size_t)(argc - 1);
    int64_t *ids = malloc(n * sizeof *ids);
    int64_t *mask = malloc(n * sizeof *mask);
    if (!ids || !mask) return 1;
    for (size_t i = 0; i < n; i++) {
        ids[i] = strtoll(argv[i + 1], NULL, 10);
        mask[i] = 1;
    }
    size_t shape[2] = {1, n};
    kiln_tensor inputs[2] = {
        {"input_ids", KILN_I64, 2, shape, ids},
        {"attention_mask", KILN_I64, 2, shape, mask},
    };

    kiln_model *model = minilm_create(0);
    if (!model) {
        fprintf(stderr, "cannot create the model: %s\n", kiln_last_error());
        return 1;
    }
    kiln_result *result = NULL;
    if (kiln_run(model, inputs, 2, &result) != 0) {
        fprintf(stderr, "cannot run the model: %s\n", kiln_last_error());
        kiln_free(model);
        return 1;
    }
    for (size_t o = 0; o < kiln_result_count(result); o++) {
        const kiln_tensor *t = kiln_result_get(result, o);
        size_t count = 1;
        printf("%s [", t->name);
        for (size_t d = 0; d < t->rank; d++) {
            printf(d ? ", %zu" : "%zu", t->shape[d]);
            count *= t->shape[d];
        }
        printf("]\n");
        for (size_t i = 0; i < count && t->dtype == KILN_F32; i++) {
            printf("%.9g\n", ((const float *)t->data)[i]);
        }
    }
    kiln_result_free(result);
    kiln_free(model);
    free(ids);
    free(mask);
    return 0;
}
