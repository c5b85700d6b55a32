// Runs a GGUF model in llama.cpp on given prompt token ids and prints what the engines comparison needs:
// llama.cpp's own tokenization of TEXT (special tokens parsed, BOS as the GGUF says), the greedy continuation
// (argmax, no end-of-text stop, so both engines produce the same number of tokens), and the logits of every
// prompt position (raw float32 rows, to LOGITS_OUT).
//
//   llama-probe MODEL N_PREDICT LOGITS_OUT TEXT ID [ID ...]
#include "llama.h"

#include <clocale>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

static int argmax(const float * row, int n) {
    int best = 0;
    for (int i = 1; i < n; ++i) {
        if (row[i] > row[best]) {
            best = i;
        }
    }
    return best;
}

static void add_tokens(llama_batch_ext * batch, const std::vector<llama_token> & tokens, llama_pos pos_0) {
    llama_batch_ext_clear(batch);
    for (size_t i = 0; i < tokens.size(); ++i) {
        const int32_t idx = llama_batch_ext_add_token(batch, 0, tokens[i]);
        const llama_pos pos = pos_0 + (llama_pos) i;
        llama_batch_ext_set_pos(batch, idx, &pos);
        llama_batch_ext_set_output_logits(batch, idx, true);
    }
}

static void print_ids(const char * label, const std::vector<llama_token> & ids) {
    printf("%s:", label);
    for (llama_token id : ids) {
        printf(" %d", id);
    }
    printf("\n");
}

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");
    if (argc < 6) {
        fprintf(stderr, "usage: %s MODEL N_PREDICT LOGITS_OUT TEXT ID [ID ...]\n", argv[0]);
        return 2;
    }
    const int n_predict = std::atoi(argv[2]);
    const std::string text = argv[4];
    std::vector<llama_token> prompt;
    for (int i = 5; i < argc; ++i) {
        prompt.push_back(std::atoi(argv[i]));
    }

    llama_backend_init();
    llama_model_params model_params = llama_model_default_params();
    model_params.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(argv[1], model_params);
    if (model == nullptr) {
        fprintf(stderr, "error: llama.cpp cannot load %s\n", argv[1]);
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    const int n_text = -llama_tokenize(vocab, text.c_str(), text.size(), nullptr, 0, true, true);
    std::vector<llama_token> tokenized(n_text);
    llama_tokenize(vocab, text.c_str(), text.size(), tokenized.data(), n_text, true, true);
    print_ids("tokenized", tokenized);

    llama_context_params ctx_params = llama_context_default_params();
    ctx_params.n_ctx = prompt.size() + n_predict;
    ctx_params.n_batch = ctx_params.n_ctx;
    ctx_params.n_ubatch = ctx_params.n_ctx;
    ctx_params.n_threads = 2;
    ctx_params.n_threads_batch = 2;
    llama_context * ctx = llama_init_from_model(model, ctx_params);
    if (ctx == nullptr) {
        fprintf(stderr, "error: cannot create a llama.cpp context\n");
        return 1;
    }
    llama_batch_ext * batch = llama_batch_ext_init(ctx);

    add_tokens(batch, prompt, 0);
    if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch) != 0) {
        fprintf(stderr, "error: llama.cpp failed to run the prompt\n");
        return 1;
    }
    FILE * out = std::fopen(argv[3], "wb");
    for (size_t i = 0; i < prompt.size(); ++i) {
        std::fwrite(llama_get_logits_ith(ctx, (int32_t) i), sizeof(float), n_vocab, out);
    }
    std::fclose(out);

    std::vector<llama_token> generated;
    llama_token next = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
    for (int step = 0; step < n_predict; ++step) {
        generated.push_back(next);
        if (step + 1 == n_predict) {
            break;
        }
        add_tokens(batch, {next}, (llama_pos) (prompt.size() + step));
        if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch) != 0) {
            fprintf(stderr, "error: llama.cpp failed to decode\n");
            return 1;
        }
        next = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
    }
    print_ids("generated", generated);

    llama_batch_ext_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
