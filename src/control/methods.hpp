#pragma once
// Binds the engine's operations to control methods.
#include "control/server.hpp"
#include "engine/engine.hpp"
#include "scheduler/planner.hpp"

namespace ferry::control {

// The engine's and the planner's operations.
void add_engine_methods(Server& server, engine::Engine& engine, scheduler::Planner& planner);

} // namespace ferry::control
