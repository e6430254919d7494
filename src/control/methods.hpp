#pragma once
// Binds the engine's operations to control methods.
#include "control/server.hpp"
#include "engine/engine.hpp"

namespace ferry::control {

void add_engine_methods(Server& server, engine::Engine& engine);

} // namespace ferry::control
